"""Gymnasium environments (installed as ``memrl.envs``)."""

from memrl.envs.memcontrol import MemControlEnv

__all__ = ["MemControlEnv"]
