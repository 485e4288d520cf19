"""Agents on MemControl-v0 (installed as ``memrl.agents``): PPO, policy save/load, baselines.

from memrl.agents import load_policy
masks = load_policy("runs/RUN/policy.zip").propose("my_images/")
"""

from memrl.agents.policy import Policy, PolicyError, load_policy

__all__ = ["Policy", "PolicyError", "load_policy"]
