"""MemControl-v0 in control mode: the agent acts *during* one fine-tune, replayed from a curve suite.

An episode is one fine-tune of one task at one preference. Each step trains ``env.chunk`` steps
and observes what a user's own run can also see; the action picks the groups to train next and
whether to stop (deliver the model as it is now). The reward, at the end, is the delivered
checkpoint's reward on the task's fixed references (:class:`memrl.curves.CurveTable`).

With ``env.backend=replay`` every point is read from the curve tables, so it holds what they hold:
the first step's mask is snapped to the nearest mask with a stored curve (Hamming distance, ties
to fewer groups; ``info["mask"]``), and a later change of mask is *not* replayed: the run keeps
its first mask and ``info["mask_changes_ignored"]`` counts the changes asked for. Stopping is
replayed exactly. With any other backend the fine-tune runs live (:class:`LiveRun`: one run in a
worker thread, paused at every chunk boundary); there a mask change is ignored the same way by
default, so replay and live deliver the same runs, and applied with ``env.mask_changes=apply``:
the next chunk trains the groups asked for, the others frozen with their optimizer state kept
(:func:`memrl.finetune.set_trainable`).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memrl.config import Config, load_config
from memrl.context import TaskContext, architecture_space, suite
from memrl.curves import FULL, CurveTable, load_curves
from memrl.descriptor import descriptor_fields
from memrl.errors import ConfigError, EpisodeOverError
from memrl.evaluator import make_evaluator
from memrl.finetune import finetune, set_trainable
from memrl.reward import PREFERENCE_FIELDS, References, Reward, draw_preference, preference_of
from memrl.scoring import CurveRecorder, loss_metrics, score_model
from memrl.tables import reference_config
from memrl.task import Task
from memrl.training import FinetuneResult

__all__ = [
    "SIGNALS",
    "ControlEnv",
    "LiveRun",
    "control_observation",
    "guarded_run",
    "control_metrics",
    "run_signals",
]

SIGNALS = ("heldout_loss_ratio", "train_loss_ratio", "mia_auc_private", "mia_tpr_private", "loss_low_tail")
"""The run's own signals a control observation shows (besides the gradient shares per group):
held-out and training losses relative to the base model's, the loss-based membership AUC and TPR
at low FPR of the training images against held-out ones, and the low tail of training losses.
Never which images are canaries."""
CURVE_METRICS = ("heldout_loss", "train_loss", "mia_auc_private", "mia_tpr_private", "loss_low_tail")
"""What the replay reads from the curves for :data:`SIGNALS`."""


def control_metrics(cfg: Config) -> tuple[str, ...]:
    """The curve metrics control mode replays: the reward's two and :data:`CURVE_METRICS`."""
    return tuple(dict.fromkeys((cfg.reward.memorization, cfg.reward.quality, *CURVE_METRICS)))


BASE_SIGNALS = (1.0, 1.0, 0.5, 0.0, 0.0)
""":data:`SIGNALS` before the first chunk: the base model's own losses, chance membership."""


def run_signals(metrics: dict[str, float], base: dict[str, float]) -> np.ndarray:
    """:data:`SIGNALS` from a checkpoint's loss metrics and the base model's (NaN as 0)."""
    signals = [
        metrics["heldout_loss"] / max(float(base["heldout_loss"]), 1e-9),
        metrics["train_loss"] / max(float(base["train_loss"]), 1e-9),
        metrics["mia_auc_private"],
        metrics["mia_tpr_private"],
        metrics["loss_low_tail"],
    ]
    return np.nan_to_num(np.array(signals, dtype=np.float32), nan=0.0)


def control_observation(
    descriptor: np.ndarray,
    preference: np.ndarray,
    progress: float,
    mask: np.ndarray,
    signals: np.ndarray,
    shares: np.ndarray,
) -> np.ndarray:
    """A control observation: descriptor, preference, share of the steps done, mask, signals and
    gradient shares, clipped to the observation space's bounds."""
    parts = [descriptor, preference, [progress], mask, signals, shares]
    return np.clip(np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]), -10.0, 10.0)


def guarded_run(
    policy: Any, ctx: TaskContext, descriptor: np.ndarray, preference: np.ndarray, chunk: int
) -> tuple[Any, np.ndarray, list[dict[str, Any]]]:
    """A trained controller's live fine-tune on ``ctx`` (a user's data, say): it picks the mask,
    watches the run's signals every ``chunk`` steps and stops it; a controller trained with
    ``env.mask_changes=apply`` also changes the groups that train. Returns the delivered model, its
    mask (every group that trained) and the trace (steps, signals, groups and the stop decision at
    every pause)."""
    k, steps = ctx.space.k, ctx.cfg.finetune.steps
    switchable = policy.config.env.mask_changes == "apply"
    base = loss_metrics(ctx.base, ctx)
    zeros = np.zeros(k, dtype=np.float32)

    def decide(obs: np.ndarray) -> np.ndarray:
        return (policy.probabilities(obs) > 0.5).astype(np.int8)

    action = decide(control_observation(descriptor, preference, 0.0, zeros, np.array(BASE_SIGNALS), zeros))
    mask = ctx.space.validate(action[:k].copy())
    run, done, trace = LiveRun(ctx, mask, chunk, switchable), 0, []
    while True:
        kind, payload = run.next()
        done = min(done + chunk, steps)
        if kind == "end":
            trace.append({"steps": done, "stop": True, "end": True, "mask": mask.tolist()})
            break
        metrics, shares = payload
        signals = run_signals(metrics, base)
        trace.append(
            {
                "steps": done,
                **dict(zip(SIGNALS, signals.tolist())),
                "stop": bool(action[k]),
                "mask": mask.tolist(),
            }
        )
        if action[k]:
            run.stop()
            break
        action = decide(control_observation(descriptor, preference, done / steps, mask, signals, shares))
        if switchable:
            mask = action[:k].copy()
        run.proceed(mask if switchable else None)
    return run.model, run.trained, trace


class _Stop(Exception):
    """Raised inside the training loop to end a live run where the controller stopped it."""


class LiveRun:
    """One fine-tune of ``mask`` on ``ctx`` in a worker thread, paused every ``chunk`` steps: at
    each pause it reports the run's signals (:func:`memrl.scoring.loss_metrics` and each group's
    gradient-norm share since the last pause) and waits for :meth:`proceed` or :meth:`stop`.
    ``switchable``: :meth:`proceed` may change the groups that train next."""

    def __init__(self, ctx: TaskContext, mask: np.ndarray, chunk: int, switchable: bool = False) -> None:
        self.ctx, self.mask, self.chunk, self.switchable = ctx, mask, chunk, switchable
        self.trained = mask.copy()
        """Every group the run has trained (or may train until the next pause)."""
        self.steps = ctx.cfg.finetune.steps
        self.model: Any = None
        self.reached = 0
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._orders: queue.Queue[tuple[str, np.ndarray | None]] = queue.Queue()
        self._gradients = CurveRecorder(ctx, mask)  # its per-group gradient-norm accounting
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _hook(self, model: Any, n: int) -> None:
        self.model, self.reached = model, n
        self._gradients.add_gradients(model)
        if n % self.chunk or n >= self.steps:
            return
        shares = np.array(self._gradients.grad_share())
        self._events.put(("pause", (loss_metrics(model, self.ctx), shares)))
        order, mask = self._orders.get()
        if order == "stop":
            raise _Stop
        if mask is not None and not np.array_equal(mask, self.mask):
            set_trainable(model, self.ctx.space.prefixes(mask))
            self.mask, self.trained = mask, self.trained | mask

    def _run(self) -> None:
        try:
            base, data, space = self.ctx.base, self.ctx.model_splits.finetune_set(), self.ctx.space
            every = space.prefixes(np.ones(space.k, dtype=np.int8)) if self.switchable else None
            self.model, _ = finetune(base, data, space.prefixes(self.mask), self.ctx.cfg, self._hook, every)
            self.reached = self.steps
            self._events.put(("end", None))
        except _Stop:
            self._events.put(("end", None))
        except Exception as exc:  # surfaced in the env's step
            self._events.put(("error", exc))

    def next(self) -> tuple[str, Any]:
        """The run's next event: ``("pause", (metrics, shares))`` or ``("end", None)``."""
        kind, payload = self._events.get()
        if kind == "error":
            raise payload
        return kind, payload

    def proceed(self, mask: np.ndarray | None = None) -> None:
        """Train the next chunk; a switchable run trains ``mask``'s groups (None: the same ones)."""
        if mask is not None and not self.switchable:
            raise ValueError("this run's groups are fixed; start it with LiveRun(..., switchable=True)")
        self._orders.put(("go", None if mask is None else np.asarray(mask, dtype=np.int8)))

    def stop(self) -> None:
        """End the run at the current pause (the model stays as it is now)."""
        if self._thread.is_alive():
            self._orders.put(("stop", None))
            self._thread.join()

    def deliver(self) -> dict[str, float]:
        """Every metric of the model as it is now (samples included; its mask: every group trained)."""
        return score_model(self.model, self.ctx, self.trained, FinetuneResult()).metrics


class ControlEnv(gym.Env):
    """``gym.make("MemControl-v0", config="bench3", mode="control")``.

    Action: ``MultiBinary(K + 1)``: the groups to train in the next chunk, then stop (1: deliver
    after this chunk). Observation: the dataset descriptor, the preference, the share of
    ``finetune.steps`` done, the current mask, :data:`SIGNALS` and the gradient-norm share of each
    group (the base model's values before the first chunk). Reward: 0 until the episode ends
    (a stop, or ``finetune.steps``), then the delivered checkpoint's reward on the task's plain
    150-step references. ``reset`` draws a training task (on replay, one whose curves and
    references are complete; ``options={"dataset": name or index, "preference": [...]}`` force
    them). ``env.backend=replay`` reads the curve tables; any other backend fine-tunes live."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: str | Path | Config | dict[str, Any] = "bench3",
        overrides: dict[str, Any] | list[str] | None = None,
        render_mode: str | None = None,
        curves: CurveTable | None = None,
        tasks: list[int] | None = None,
        descriptors: dict[int, np.ndarray] | None = None,
    ) -> None:
        """``curves``: a loaded curve table to replay (else read from the config's tables);
        ``tasks``: the task indices ``reset`` draws from (default: every training task it can; named
        tasks may be held out);
        ``descriptors``: a cache of task descriptors shared between envs."""
        super().__init__()
        cfg = load_config(config, overrides)
        if cfg.env.mode != "control":
            cfg = cfg.with_changes({"env.mode": "control"})
        self.cfg = cfg
        every = int(cfg.finetune.checkpoint_every or 0)
        self.chunk = cfg.env.chunk or every
        self.per_step = self.chunk // every  # checkpoints per env step
        self.points = cfg.finetune.steps // every  # checkpoints of a whole run
        self.live = cfg.env.backend != "replay"
        self.applies_changes = self.live and cfg.env.mask_changes == "apply"
        self.k = architecture_space(cfg).k
        self.entries = suite(cfg)
        self.evaluator = make_evaluator(cfg)
        self.curves: CurveTable | None = None
        self.masks: np.ndarray | None = None
        if self.live:
            self.tasks = [t for t, e in enumerate(self.entries) if not e.heldout] or list(
                range(len(self.entries))
            )
        else:
            self.curves = curves or load_curves(cfg, control_metrics(cfg))
            missing = sorted(set(control_metrics(cfg)) - set(self.curves.values))
            if missing:
                raise ConfigError(
                    f"the curve table given lacks the metrics control mode replays ({', '.join(missing)}); "
                    "load it with load_curves(cfg, control_metrics(cfg))"
                )
            complete = self.curves.complete()
            self.tasks = [t for t in range(len(self.entries)) if complete[t] and not self.curves.heldout[t]]
            self.masks = np.array(
                [[int(c) for c in m] for m in self.curves.masks if m != FULL], dtype=np.int8
            )
            # the masks with curves, in table order (FULL, every parameter, is not a mask of groups)
        if tasks is not None:  # named tasks: held-out ones too (a judge's), where they can be run
            runnable = self.curves.complete() if self.curves is not None else np.ones(len(self.entries), bool)
            self.tasks = [t for t in tasks if runnable[t]]
        if not self.tasks:
            raise ConfigError(
                "env.mode=control replays curves and no training task of this suite has complete curves "
                "yet; continue them with python -m memrl.tables build --config ..., or run it live "
                "(env.backend=inprocess)"
            )
        self._descriptors: dict[int, np.ndarray] = descriptors if descriptors is not None else {}
        self._references: dict[int, References] = {}
        n_obs = len(descriptor_fields(self.k)) + len(PREFERENCE_FIELDS) + 1 + self.k + len(SIGNALS) + self.k
        self.action_space = spaces.MultiBinary(self.k + 1)
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(n_obs,), dtype=np.float32)
        self.render_mode = render_mode
        self.zero_signals = False
        """An ablation: observe no run signals (does the controller use them?)."""
        self.zero_descriptor = False
        """An ablation: observe a zero descriptor (does the controller use the data's description?)."""
        self._done = True
        self.task, self.mask_row, self.checkpoint = 0, 0, -1
        self.mask = np.zeros(self.k, dtype=np.int8)
        self.preference = preference_of(cfg.reward)
        self.changes, self.ignored = 0, 0
        self.run: LiveRun | None = None
        self._pause: tuple[dict[str, float], np.ndarray] | None = None
        self.diagnostics: dict[str, Any] = {"cache_hit": not self.live, "timings": {}}

    def descriptor(self, t: int) -> np.ndarray:
        """Task ``t``'s dataset descriptor (computed once)."""
        if t not in self._descriptors:
            entry = self.entries[t]
            task = Task(entry.cfg, self.evaluator, entry.name, entry.heldout)
            self._descriptors[t] = np.asarray(task.descriptor(), dtype=np.float32)
        return self._descriptors[t]

    def references(self, t: int) -> References:
        """Task ``t``'s references: plain evaluations of no fine-tune and the mask of ones at 150
        steps (read from the curve tables on replay, evaluated once live)."""
        if self.curves is not None:
            found = self.curves.references[t]
            assert found is not None  # only tasks with references are drawn
            return found
        if t not in self._references:
            entry = self.entries[t]
            task = Task(reference_config(entry.cfg), self.evaluator, entry.name, entry.heldout)
            self._references[t] = task.references()
        return self._references[t]

    def _signals(self) -> tuple[np.ndarray, np.ndarray]:
        if self.checkpoint < 0 or self.zero_signals:
            return np.array(BASE_SIGNALS, dtype=np.float32), np.zeros(self.k, dtype=np.float32)
        if self.curves is not None:
            at = (self.task, self.mask_row, 0, self.checkpoint)
            value = {name: float(self.curves.values[name][at]) for name in CURVE_METRICS}
            shares = np.nan_to_num(self.curves.grad_share[at], nan=0.0)
        else:
            assert self._pause is not None
            value, shares = self._pause
        signals = run_signals(value, self.references(self.task).none)
        return signals, np.asarray(shares, dtype=np.float32)

    def _observation(self) -> np.ndarray:
        signals, shares = self._signals()
        done = (self.checkpoint + 1) / self.points
        descriptor = self.descriptor(self.task)
        if self.zero_descriptor:
            descriptor = np.zeros_like(descriptor)
        return control_observation(descriptor, self.preference, done, self.mask, signals, shares)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.close()
        options = options or {}
        if "dataset" in options:
            d = options["dataset"]
            names = [e.name for e in self.entries]
            self.task = names.index(d) if isinstance(d, str) else int(d)
            if self.curves is not None and (
                self.curves.references[self.task] is None or not self.curves.complete()[self.task]
            ):
                raise ValueError(f"task {names[self.task]!r} has no complete curves to replay")
        else:
            self.task = int(self.np_random.choice(self.tasks))
        if "preference" in options:
            self.preference = np.asarray(options["preference"], dtype=np.float32)
        else:
            self.preference = draw_preference(self.cfg.reward, self.cfg.env.preferences, self.np_random)
        self.checkpoint, self.mask_row, self.changes, self.ignored, self._done = -1, 0, 0, 0, False
        self.mask = np.zeros(self.k, dtype=np.int8)
        self._first: np.ndarray | None = None
        return self._observation(), {"task": self.entries[self.task].name}

    def _snap(self, mask: np.ndarray) -> int:
        """The row of the stored curve mask nearest to ``mask`` (Hamming; ties to fewer groups)."""
        assert self.masks is not None
        distance = np.abs(self.masks - mask[None]).sum(axis=1)
        order = np.lexsort((self.masks.sum(axis=1), distance))
        return int(order[0])

    def _weight(self) -> float:
        return float(self.preference[0]) / max(float(self.preference[0] + self.preference[1]), 1e-9)

    def _advance(self, first: bool) -> bool:
        """Train one chunk; whether the run reached ``finetune.steps``."""
        self.checkpoint = min(self.checkpoint + self.per_step, self.points - 1)
        if self.run is None:
            return self.checkpoint == self.points - 1
        if not first:
            self.run.proceed(self.mask if self.applies_changes else None)
        kind, payload = self.run.next()
        self._pause = payload if kind == "pause" else self._pause
        return kind == "end"

    def _delivered(self) -> tuple[float, dict[str, float]]:
        """The reward and metrics of the run as it is now."""
        w = self._weight()
        if self.curves is not None:
            at = (self.task, self.mask_row, 0, self.checkpoint)
            value = self.curves.rewards(self.cfg.reward, self.task, w)[self.mask_row, 0, self.checkpoint]
            return float(value), {name: float(v[at]) for name, v in self.curves.values.items()}
        assert self.run is not None
        self.run.stop()
        metrics = self.run.deliver()
        terms = Reward(self.cfg.reward, self.references(self.task)).terms(metrics)
        return -(w * terms["memorization_term"] + (1 - w) * terms["quality_term"]), metrics

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise EpisodeOverError("the episode is over: call reset()")
        action = np.asarray(action, dtype=np.int8).reshape(-1)
        if action.shape != (self.k + 1,):
            raise ValueError(f"action of shape {action.shape}; control mode takes K + 1 = {self.k + 1} bits")
        asked, stop = action[: self.k], bool(action[self.k])
        first = self._first is None
        if self._first is None:
            self._first = asked.copy()
            if self.masks is not None:
                self.mask_row = self._snap(asked)
                self.mask = self.masks[self.mask_row].copy()
            else:
                ctx = TaskContext.get(self.entries[self.task].cfg)
                self.mask = ctx.space.validate(asked.copy())
                self.run = LiveRun(ctx, self.mask, self.chunk, switchable=self.applies_changes)
        elif self.applies_changes:
            assert self.run is not None
            if not np.array_equal(asked, self.mask):
                self.mask, self.changes = self.run.ctx.space.validate(asked.copy()), self.changes + 1
        elif not np.array_equal(asked, self._first):
            self.ignored += 1
        ended = self._advance(first)
        self._done = stop or ended
        reward, info = (
            0.0,
            {
                "task": self.entries[self.task].name,
                "mask": self.mask.tolist(),
                "steps": int(self.chunk // self.per_step * (self.checkpoint + 1)),
                "mask_changes": self.changes,
                "mask_changes_ignored": self.ignored,
            },
        )
        if self._done:
            value, metrics = self._delivered()
            ok = bool(np.isfinite(value))
            reward = value if ok else float(self.cfg.reward.failure_penalty)
            info.update(
                delivered_steps=info["steps"],
                ok=ok,
                error=None if ok else "no stored point at the delivered checkpoint",
                metrics={k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()},
            )
        return self._observation(), float(reward), self._done, False, info

    def close(self) -> None:
        """Stop a live run still paused in its thread."""
        if self.run is not None:
            self.run.stop()
            self.run = None
