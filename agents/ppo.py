"""PPO on MemControl-v0: construction from config, TensorBoard/episode logging, and checkpoints
that resume without unpickling anything (weights and optimizer state with
``torch.load(weights_only=True)``, counters as JSON)."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from memrl.agents.policy import read_weights
from memrl.agents.search_net import CandidatePolicy
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from memrl.config import Config
from memrl.errors import PolicyError
from memrl.runs import RunFolder
from memrl.utils import atomic_path

__all__ = [
    "AtomicCheckpoint",
    "EvaluationLogger",
    "MAX_STEPS",
    "PrefetchVecEnv",
    "ProgressLog",
    "build_ppo",
    "load_checkpoint",
    "make_env",
    "save_checkpoint",
]

log = logging.getLogger(__name__)


class PrefetchVecEnv(DummyVecEnv):
    """Environments in this process whose evaluations of one vector step run at once: with the Ray
    backend, the ``n_envs`` fine-tunes of a step are concurrent Ray tasks (one cluster, many GPUs)."""

    def step_wait(self):  # type: ignore[no-untyped-def]
        specs = []
        for env, action in zip(self.envs, self.actions):
            inner: Any = env.unwrapped
            mask = inner.pending_mask(action)
            if mask is not None:
                specs += inner.task.specs_with_references([mask])
        if specs:
            self.envs[0].unwrapped.evaluator.evaluate_many(specs)  # type: ignore[attr-defined]
        return super().step_wait()


def _env_with_threads(threads: int, **kwargs: Any) -> gym.Env:
    """MemControl-v0 in a worker process whose torch uses ``threads`` threads."""
    torch.set_num_threads(threads)
    return gym.make("MemControl-v0", **kwargs)


def make_env(cfg: Config, n_envs: int = 1, seed: int = 0):
    """A vectorised MemControl-v0: with the Ray backend, ``n_envs`` envs in this process whose
    evaluations run concurrently on Ray; otherwise separate processes when ``n_envs > 1``, which
    share the machine's cores (each process's torch gets cores / n_envs threads: more threads than
    cores makes every fine-tune several times slower)."""
    kwargs = {"config": cfg}
    env_id: Any = "MemControl-v0"
    if cfg.env.backend == "ray":
        vec_cls: Any = PrefetchVecEnv
    elif n_envs > 1:
        vec_cls = SubprocVecEnv
        env_id = functools.partial(_env_with_threads, max(1, (os.cpu_count() or 1) // n_envs))
    else:
        vec_cls = DummyVecEnv
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=kwargs, vec_env_cls=vec_cls)


def build_ppo(cfg: Config, env, run_dir: Path | None = None) -> PPO:
    """PPO with ``cfg.ppo``'s settings and ``cfg.seed`` (search mode: :class:`CandidatePolicy`, which
    scores every mask); TensorBoard logs under ``run_dir/tb``. A controller's stop bit starts at
    :func:`stop_prior` instead of 1/2."""
    p = cfg.ppo
    control = cfg.env.mode == "control"
    policy: Any = CandidatePolicy if cfg.env.mode == "search" else "MlpPolicy"
    gamma = p.gamma if p.gamma is not None else 1.0 if control else 0.99
    model = PPO(
        policy,
        env,
        n_steps=p.n_steps,
        batch_size=p.batch_size,
        n_epochs=p.n_epochs,
        learning_rate=p.learning_rate,
        gamma=gamma,
        ent_coef=p.ent_coef,
        policy_kwargs={"net_arch": list(p.net_arch)},
        tensorboard_log=str(RunFolder(run_dir).tensorboard) if run_dir is not None else None,
        seed=cfg.seed,
        device="cpu",
        verbose=0,
    )
    if control:
        head: Any = model.policy.action_net  # the Bernoulli logits: the stop bit is the last
        p_stop = stop_prior(cfg)
        with torch.no_grad():
            head.bias[-1] = math.log(p_stop / (1 - p_stop))
    return model


def stop_prior(cfg: Config) -> float:
    """The probability of stopping at each chunk that an untrained controller starts with: 2 over
    the chunks of a run, so its first episodes stop anywhere from the first chunk to the last (at
    1/2, the Bernoulli default, they would end within two chunks and the long runs would never be
    tried). Exploration only: the optimum is unchanged."""
    chunk = cfg.env.chunk or cfg.finetune.checkpoint_every or cfg.finetune.steps
    return min(0.5, 2 * chunk / cfg.finetune.steps)


class EvaluationLogger(BaseCallback):
    """Logs every finished episode: reward, each metric, cache hit rate, best mask so far.

    Appends one JSON line per episode to ``run_dir/episodes.jsonl`` (read by the report) and writes
    TensorBoard scalars through SB3's logger: means over the rollout, once per rollout (a replayed
    run finishes thousands of episodes per second).
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = RunFolder(run_dir).episodes
        self.best_reward = -np.inf
        self.best_mask: list[int] | None = None
        self.episodes = 0
        self.hits = 0
        self.failures = 0
        self._lines: list[str] = []

    def _on_step(self) -> bool:
        dones = self.locals["dones"]
        diagnostics = self.training_env.get_attr("diagnostics") if any(dones) else []
        for i, (info, reward, done) in enumerate(zip(self.locals["infos"], self.locals["rewards"], dones)):
            if not done or "metrics" not in info:
                continue
            self.episodes += 1
            cache_hit = bool(diagnostics[i]["cache_hit"])
            self.hits += int(cache_hit)
            self.failures += int(not info["ok"])
            reward = float(reward)
            if reward > self.best_reward or self.best_mask is None:
                self.best_reward, self.best_mask = reward, list(info["mask"])
            self.logger.record_mean("episode/reward", reward)
            for key, value in info["metrics"].items():
                if value is not None and np.isfinite(value):
                    self.logger.record_mean(f"metrics/{key}", value)
            self.logger.record("episode/cache_hit_rate", self.hits / self.episodes)
            self.logger.record("episode/best_reward", self.best_reward)
            best = "".join(map(str, self.best_mask or []))
            self.logger.record("episode/best_mask", best, exclude="tensorboard")
            row: dict[str, Any] = {
                "timestep": int(self.num_timesteps),
                "reward": reward,
                "mask": info["mask"],
                "ok": info["ok"],
                "cache_hit": cache_hit,
                "error": info["error"],
                **{
                    k: info[k]
                    for k in ("memorization_term", "quality_term", "delivered_steps", "mask_changes")
                    if k in info
                },
            }
            self._lines.append(json.dumps(row))
        return True

    def _on_rollout_end(self) -> None:
        if self._lines:
            with self.path.open("a") as fh:
                fh.write("\n".join(self._lines) + "\n")
            self._lines = []

    def _on_training_end(self) -> None:
        self._on_rollout_end()


def save_checkpoint(model: PPO, path: Path) -> None:
    """Write ``model``'s weights, optimizer state and counters to ``path`` atomically."""
    members = {"policy.pth": model.policy.state_dict(), "optimizer.pth": model.policy.optimizer.state_dict()}
    state = {"format": 1, "num_timesteps": int(model.num_timesteps), "n_updates": int(model._n_updates)}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, value in members.items():
            buf = io.BytesIO()
            torch.save(value, buf)
            zf.writestr(name, buf.getvalue())
        zf.writestr("state.json", json.dumps(state))


MAX_STEPS = 10**12
"""The largest step count a checkpoint may claim."""


def load_checkpoint(model: PPO, path: Path) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into a freshly built ``model``.

    Nothing is unpickled; a file that is not such a checkpoint raises PolicyError.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("state.json")
            if info.file_size > 4096:
                raise PolicyError(f"{path}: state.json is {info.file_size:,} bytes; not a memrl checkpoint")
            state = json.loads(zf.read("state.json").decode("utf-8"))
    except (KeyError, zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(
            f"{path}: not a memrl checkpoint ({exc}); delete it to start the run afresh"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and 0 <= state[k] <= MAX_STEPS
        for k in ("num_timesteps", "n_updates")
    ):
        raise PolicyError(
            f"{path}: state.json lacks whole num_timesteps and n_updates between 0 and {MAX_STEPS:,}; "
            "not a memrl checkpoint: delete it to start the run afresh"
        )
    try:
        model.policy.load_state_dict(read_weights(path, "policy.pth"))
        model.policy.optimizer.load_state_dict(read_weights(path, "optimizer.pth"))
    except (RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, PolicyError):
            raise
        raise PolicyError(
            f"{path}: the checkpoint does not fit this run's network ({str(exc)[:160]}); "
            "resume with the run's own config.yaml"
        ) from None
    model.num_timesteps, model._n_updates = state["num_timesteps"], state["n_updates"]


class ProgressLog(BaseCallback):
    """Logs PPO's progress (timesteps, share done, time left) through ``logging`` every
    ``every_s`` seconds and at the end: the progress bar draws nothing when the output is a file,
    and the run's log file (``train.log``) gets these lines."""

    def __init__(self, total: int, every_s: float = 30.0) -> None:
        super().__init__()
        self.total, self.every_s = total, every_s
        self.start = self.last = 0.0
        self.first = 0

    def _on_training_start(self) -> None:
        self.start = self.last = time.monotonic()
        self.first = int(self.num_timesteps)

    def _on_step(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.report(now)
        return True

    def _on_training_end(self) -> None:
        self.report(time.monotonic())

    def report(self, now: float) -> None:
        done = int(self.num_timesteps) - self.first
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        log.info(
            "PPO: %d of %d timesteps (%.0f%%), %.0f s so far, about %.0f s left",
            done,
            self.total,
            100 * done / max(self.total, 1),
            elapsed,
            left,
        )


class AtomicCheckpoint(BaseCallback):
    """Saves a resumable checkpoint to ``run_dir/checkpoints/last.zip`` after every rollout."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = RunFolder(run_dir).checkpoint

    def save(self) -> None:
        assert isinstance(self.model, PPO)
        save_checkpoint(self.model, self.path)

    def _on_rollout_end(self) -> None:
        self.save()

    def _on_step(self) -> bool:
        return True
