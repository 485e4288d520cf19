"""memrl: choose which diffusion-UNet modules to fine-tune, by reinforcement learning, to control
memorization (MemControl, Dutt et al. WACV 2025, as a reusable Gymnasium environment + PPO agent).

Importing memrl is cheap: torch, diffusers and peft load only when used. It registers the
Gymnasium environment ``MemControl-v0``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]


def _register() -> None:
    from gymnasium.envs.registration import register, registry

    if "MemControl-v0" not in registry:
        register(id="MemControl-v0", entry_point="memrl.envs:make_memcontrol")


_register()
