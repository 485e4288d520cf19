"""MemControl-v0 in control mode: the agent acts *during* one fine-tune, replayed from a curve suite.

An episode is one fine-tune of one task at one preference. Each step trains ``env.chunk`` steps
and observes what a user's own run can also see; the action picks the groups to train next and
whether to stop (deliver the model as it is now). The reward, at the end, is the delivered
checkpoint's reward on the task's fixed references (:class:`memrl.curves.CurveTable`).

Replay (this module) reads every point from the curve tables, so it holds what the tables hold:
the first step's mask is snapped to the nearest mask with a stored curve (Hamming distance, ties
to fewer groups; ``info["mask"]``), and a later change of mask is *not* replayed: the run keeps
its first mask and ``info["mask_changes_ignored"]`` counts the changes asked for. Stopping is
replayed exactly. Mask changes mid-run need live fine-tunes (not built yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memrl.config import Config, load_config
from memrl.context import architecture_space, suite
from memrl.curves import FULL, CurveTable, load_curves
from memrl.descriptor import descriptor_fields
from memrl.errors import ConfigError, EpisodeOverError
from memrl.evaluator import make_evaluator
from memrl.reward import PREFERENCE_FIELDS, draw_preference, preference_of
from memrl.task import Task

__all__ = ["SIGNALS", "ControlEnv"]

SIGNALS = ("heldout_loss_ratio", "train_loss_ratio", "mia_auc_private", "mia_tpr_private", "loss_low_tail")
"""The run's own signals a control observation shows (besides the gradient shares per group):
held-out and training losses relative to the base model's, the loss-based membership AUC and TPR
at low FPR of the training images against held-out ones, and the low tail of training losses.
Never which images are canaries."""
CURVE_METRICS = ("heldout_loss", "train_loss", "mia_auc_private", "mia_tpr_private", "loss_low_tail")
"""What the replay reads from the curves for :data:`SIGNALS`."""


class ControlEnv(gym.Env):
    """``gym.make("MemControl-v0", config="bench3", mode="control")``.

    Action: ``MultiBinary(K + 1)``: the groups to train in the next chunk, then stop (1: deliver
    after this chunk). Observation: the dataset descriptor, the preference, the share of
    ``finetune.steps`` done, the current mask, :data:`SIGNALS` and the gradient-norm share of each
    group (the base model's values before the first chunk). Reward: 0 until the episode ends
    (a stop, or ``finetune.steps``), then the delivered checkpoint's reward. ``reset`` draws a
    training task whose curves and references are complete (``options={"dataset": name or index,
    "preference": [...]}`` force them)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: str | Path | Config | dict[str, Any] = "bench3",
        overrides: dict[str, Any] | list[str] | None = None,
        render_mode: str | None = None,
        curves: CurveTable | None = None,
    ) -> None:
        super().__init__()
        cfg = load_config(config, overrides)
        if cfg.env.mode != "control":
            cfg = cfg.with_changes({"env.mode": "control"})
        self.cfg = cfg
        every = int(cfg.finetune.checkpoint_every or 0)
        self.chunk = cfg.env.chunk or every
        self.per_step = self.chunk // every  # checkpoints per env step
        self.curves = curves or load_curves(
            cfg, (cfg.reward.memorization, cfg.reward.quality, *CURVE_METRICS)
        )
        self.k = architecture_space(cfg).k
        complete = self.curves.complete()
        self.tasks = [t for t in range(len(self.curves.names)) if complete[t] and not self.curves.heldout[t]]
        if not self.tasks:
            raise ConfigError(
                "env.mode=control replays curves and no training task of this suite has complete curves "
                "yet; continue them with python -m memrl.tables build --config ..."
            )
        self.entries = suite(cfg)
        self.masks = np.array(
            [[int(c) for c in m] for m in self.curves.masks if m != FULL], dtype=np.int8
        )  # the masks with curves, in table order (FULL, every parameter, is not a mask of groups)
        self._descriptors: dict[int, np.ndarray] = {}
        n_obs = len(descriptor_fields(self.k)) + len(PREFERENCE_FIELDS) + 1 + self.k + len(SIGNALS) + self.k
        self.action_space = spaces.MultiBinary(self.k + 1)
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(n_obs,), dtype=np.float32)
        self.render_mode = render_mode
        self.zero_signals = False
        """An ablation: observe no run signals (does the controller use them?)."""
        self._done = True
        self.task, self.mask_row, self.checkpoint = 0, 0, -1
        self.preference = preference_of(cfg.reward)
        self.changes = 0
        self.diagnostics: dict[str, Any] = {"cache_hit": True, "timings": {}}
        """Replay: every point is a stored evaluation."""

    def descriptor(self, t: int) -> np.ndarray:
        """Task ``t``'s dataset descriptor (computed once)."""
        if t not in self._descriptors:
            entry = self.entries[t]
            task = Task(entry.cfg, make_evaluator(self.cfg), entry.name, entry.heldout)
            self._descriptors[t] = np.asarray(task.descriptor(), dtype=np.float32)
        return self._descriptors[t]

    def _signals(self) -> tuple[np.ndarray, np.ndarray]:
        refs = self.curves.references[self.task]
        assert refs is not None  # only tasks with references are drawn
        if self.checkpoint < 0 or self.zero_signals:
            base = [1.0, 1.0, 0.5, 0.0, 0.0]
            return np.array(base, dtype=np.float32), np.zeros(self.k, dtype=np.float32)
        at = (self.task, self.mask_row, 0, self.checkpoint)
        value = {name: float(self.curves.values[name][at]) for name in CURVE_METRICS}
        signals = [
            value["heldout_loss"] / max(float(refs.none["heldout_loss"]), 1e-9),
            value["train_loss"] / max(float(refs.none["train_loss"]), 1e-9),
            value["mia_auc_private"],
            value["mia_tpr_private"],
            value["loss_low_tail"],
        ]
        shares = np.nan_to_num(self.curves.grad_share[at], nan=0.0)
        return np.nan_to_num(np.array(signals, dtype=np.float32), nan=0.0), shares.astype(np.float32)

    def _observation(self, mask: np.ndarray) -> np.ndarray:
        signals, shares = self._signals()
        done = (self.checkpoint + 1) / len(self.curves.steps)
        parts = [self.descriptor(self.task), self.preference, [done], mask, signals, shares]
        obs = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        return np.clip(obs, -10.0, 10.0)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        if "dataset" in options:
            d = options["dataset"]
            self.task = self.curves.names.index(d) if isinstance(d, str) else int(d)
            if self.curves.references[self.task] is None or not self.curves.complete()[self.task]:
                raise ValueError(f"task {self.curves.names[self.task]!r} has no complete curves to replay")
        else:
            self.task = int(self.np_random.choice(self.tasks))
        if "preference" in options:
            self.preference = np.asarray(options["preference"], dtype=np.float32)
        else:
            self.preference = draw_preference(self.cfg.reward, self.cfg.env.preferences, self.np_random)
        self.checkpoint, self.mask_row, self.changes, self._done = -1, 0, 0, False
        self._first: np.ndarray | None = None
        return self._observation(np.zeros(self.k, dtype=np.float32)), {"task": self.curves.names[self.task]}

    def _snap(self, mask: np.ndarray) -> int:
        """The row of the stored curve mask nearest to ``mask`` (Hamming; ties to fewer groups)."""
        distance = np.abs(self.masks - mask[None]).sum(axis=1)
        order = np.lexsort((self.masks.sum(axis=1), distance))
        return int(order[0])

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise EpisodeOverError("the episode is over: call reset()")
        action = np.asarray(action, dtype=np.int8).reshape(-1)
        if action.shape != (self.k + 1,):
            raise ValueError(f"action of shape {action.shape}; control mode takes K + 1 = {self.k + 1} bits")
        mask, stop = action[: self.k], bool(action[self.k])
        if self._first is None:
            self._first = mask.copy()
            self.mask_row = self._snap(mask)
        elif not np.array_equal(mask, self._first):
            self.changes += 1
        self.checkpoint = min(self.checkpoint + self.per_step, len(self.curves.steps) - 1)
        last = self.checkpoint == len(self.curves.steps) - 1
        self._done = stop or last
        reward, info = (
            0.0,
            {
                "task": self.curves.names[self.task],
                "mask": self.masks[self.mask_row].tolist(),
                "steps": int(self.curves.steps[self.checkpoint]),
                "mask_changes_ignored": self.changes,
            },
        )
        if self._done:
            w = float(self.preference[0]) / max(float(self.preference[0] + self.preference[1]), 1e-9)
            value = self.curves.rewards(self.cfg.reward, self.task, w)[self.mask_row, 0, self.checkpoint]
            reward = float(value) if np.isfinite(value) else float(self.cfg.reward.failure_penalty)
            at = (self.task, self.mask_row, 0, self.checkpoint)
            info["delivered_steps"] = info["steps"]
            info["ok"] = bool(np.isfinite(value))
            info["error"] = None if info["ok"] else "no stored point at the delivered checkpoint"
            info["metrics"] = {name: float(v[at]) for name, v in self.curves.values.items()}
        obs = self._observation(self.masks[self.mask_row].astype(np.float32))
        return obs, reward, self._done, False, info
