"""PPO on MemControl-v0: construction from config, TensorBoard/episode logging, atomic checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from memrl.config import Config
from memrl.utils import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.zip"


def make_env(cfg: Config, n_envs: int = 1, seed: int = 0):
    """A vectorised MemControl-v0 (separate processes when ``n_envs > 1``)."""
    kwargs = {"config": cfg}
    vec_cls = SubprocVecEnv if n_envs > 1 else DummyVecEnv
    return make_vec_env("MemControl-v0", n_envs=n_envs, seed=seed, env_kwargs=kwargs, vec_env_cls=vec_cls)


def build_ppo(cfg: Config, env, run_dir: Path) -> PPO:
    """PPO sized for expensive steps: every env step is a fine-tune, so rollouts are short."""
    p = cfg.ppo
    return PPO(
        "MlpPolicy",
        env,
        n_steps=p.n_steps,
        batch_size=min(p.batch_size, p.n_steps * p.n_envs),
        n_epochs=p.n_epochs,
        learning_rate=p.learning_rate,
        gamma=p.gamma,
        ent_coef=p.ent_coef,
        policy_kwargs={"net_arch": list(p.net_arch)},
        tensorboard_log=str(run_dir / "tb"),
        seed=cfg.seed,
        device="cpu",
        verbose=0,
    )


class EvaluationLogger(BaseCallback):
    """Logs every finished episode: reward, each metric, cache hit rate, best mask so far.

    Writes TensorBoard scalars through SB3's logger and appends one JSON line per episode to
    ``run_dir/episodes.jsonl`` (read by the report).
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = run_dir / "episodes.jsonl"
        self.best_reward = -np.inf
        self.best_mask: list[int] | None = None
        self.episodes = 0
        self.hits = 0

    def _on_step(self) -> bool:
        for info, reward, done in zip(self.locals["infos"], self.locals["rewards"], self.locals["dones"]):
            if not done or "metrics" not in info:
                continue
            self.episodes += 1
            self.hits += int(info["cache_hit"])
            reward = float(reward)
            if reward > self.best_reward:
                self.best_reward, self.best_mask = reward, info["mask"]
            self.logger.record("episode/reward", reward)
            for key, value in info["metrics"].items():
                if np.isfinite(value):
                    self.logger.record(f"metrics/{key}", value)
            self.logger.record("episode/cache_hit_rate", self.hits / self.episodes)
            self.logger.record("episode/best_reward", self.best_reward)
            self.logger.record("episode/best_mask", "".join(map(str, self.best_mask)), exclude="tensorboard")
            row: dict[str, Any] = {
                "timestep": int(self.num_timesteps),
                "reward": reward,
                "mask": info["mask"],
                "ok": info["ok"],
                "cache_hit": info["cache_hit"],
                "error": info["error"],
                **{k: info[k] for k in ("memorization_term", "quality_term") if k in info},
            }
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            self.logger.dump(self.num_timesteps)
        return True


class AtomicCheckpoint(BaseCallback):
    """Saves the model to ``run_dir/checkpoints/last.zip`` after every rollout, atomically."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = run_dir / CHECKPOINT

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            zip_path = tmp.with_suffix(".zip")
            self.model.save(zip_path)
            zip_path.replace(tmp)
        (self.path.parent / "progress.json").write_text(json.dumps({"num_timesteps": self.num_timesteps}))

    def _on_rollout_end(self) -> None:
        self.save()

    def _on_step(self) -> bool:
        return True
