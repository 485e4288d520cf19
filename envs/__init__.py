"""Gymnasium environments (installed as ``memrl.envs``): MemControl-v0 in its four modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
from memrl.envs.control import ControlEnv
from memrl.envs.memcontrol import MemControlEnv

from memrl.config import Config, load_config

__all__ = ["ControlEnv", "MemControlEnv", "make_memcontrol"]


def make_memcontrol(
    config: str | Path | Config | dict[str, Any] = "default",
    overrides: dict[str, Any] | list[str] | None = None,
    render_mode: str | None = None,
    mode: str | None = None,
) -> gym.Env:
    """What ``gym.make("MemControl-v0", ...)`` builds: :class:`ControlEnv` for ``mode="control"``
    (or ``env.mode: control`` in the config), else :class:`MemControlEnv` (mask, sequential and
    search modes)."""
    cfg = load_config(config, overrides)
    if mode is not None:
        cfg = cfg.with_changes({"env.mode": mode})
    if cfg.env.mode == "control":
        return ControlEnv(cfg, render_mode=render_mode)
    return MemControlEnv(cfg, render_mode=render_mode)
