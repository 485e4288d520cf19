"""Curve tables: every (task, mask, seed) of a curve suite as its metrics at every checkpoint.

A curve suite (``finetune.checkpoint_every`` set, MemControl-Bench v3: ``configs/bench3.yaml``)
stores one checkpointed evaluation per (task, mask, seed) (:func:`memrl.tables.curve_jobs`).
:func:`load_curves` reads them, with nothing evaluated, into :class:`CurveTable`: dense arrays
``(tasks, masks, seeds, checkpoints)`` per metric, so the reward of any stored (mask, steps) pair
on a task is an array lookup. Rewards are on references fixed per task: the masks of zeros and of
ones as plain evaluations at :data:`memrl.tables.REFERENCE_STEPS` steps, so every point of every
curve is on one scale (:mod:`memrl.reward`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memrl.config import Config, RewardConfig
from memrl.context import TaskContext, full_unet, suite
from memrl.errors import StoreError
from memrl.evaluator import make_evaluator
from memrl.reward import References, Reward
from memrl.spec import SPEC_VERSION, with_derived_metrics
from memrl.tables import REFERENCE_STEPS, curve_masks, reference_config
from memrl.task import NOISE_SEEDS
from memrl.utils import stable_hash

__all__ = ["FULL", "CurveTable", "load_curves"]

FULL = "full"
"""The name of full fine-tuning (every UNet parameter) among a curve table's masks."""


@dataclass
class CurveTable:
    """The curves of a suite. ``values[metric]`` is a float array (tasks, masks, seeds, checkpoints),
    NaN where nothing is stored (a mask not fine-tuned with that seed, a metric not measured at
    that checkpoint: sample-based ones exist at ``finetune.sample_at`` and the last step only)."""

    names: list[str]
    heldout: np.ndarray
    masks: list[str]
    """Mask strings (``"1010000"``) and :data:`FULL`."""
    seeds: tuple[int, ...]
    steps: np.ndarray
    """The checkpoints, in fine-tune steps."""
    values: dict[str, np.ndarray]
    references: list[References | None]
    """Each task's references (None where they are not stored yet)."""
    grad_share: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """(tasks, masks, seeds, checkpoints, groups) gradient-norm shares (NaN where not stored)."""
    sources: list[str] = field(default_factory=list)
    """Each task's data source (``data.source``): leave-one-source-out folds group by it."""

    def digest(self, tasks: list[int]) -> str:
        """A hash of everything stored for ``tasks`` (their curves, gradient shares and
        references): what a result computed from those tasks depends on."""
        arrays = [self.values[name][tasks] for name in sorted(self.values)]
        if self.grad_share.size:
            arrays.append(self.grad_share[tasks])
        return stable_hash(
            [
                [self.names[t] for t in tasks],
                self.masks,
                self.steps.tolist(),
                sorted(self.values),
                [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays],
                [_as_dict(self.references[t]) for t in tasks],
            ]
        )

    def index(self, task: str | int, mask: str, steps: int, seed: int = 0) -> tuple[int, int, int, int]:
        """Array indices of a (task, mask, steps, seed); a StoreError names what is not in the table."""
        t = task if isinstance(task, int) else self._find(self.names, task, "task")
        m = self._find(self.masks, mask, "mask")
        s = self._find(list(self.seeds), seed, "seed")
        where = np.flatnonzero(self.steps == steps)
        if not len(where):
            raise StoreError(
                f"steps={steps} is not a checkpoint of this curve table ({', '.join(map(str, self.steps))}); "
                "choose one of them"
            )
        return t, m, s, int(where[0])

    @staticmethod
    def _find(items: list[Any], item: Any, what: str) -> int:
        if item not in items:
            shown = ", ".join(map(str, items[:8])) + (" ..." if len(items) > 8 else "")
            raise StoreError(f"{what} {item!r} is not in this curve table ({shown})")
        return items.index(item)

    def metric(self, name: str, task: str | int, mask: str, steps: int, seed: int = 0) -> float:
        """One stored metric of one (task, mask, steps, seed)."""
        return float(self.values[name][self.index(task, mask, steps, seed)])

    def terms(self, reward: RewardConfig, task: int) -> np.ndarray:
        """(masks, seeds, checkpoints, 2) memorization and quality terms of every point of ``task``
        on its fixed references (NaN where the task's references or a point are missing)."""
        refs = self.references[task]
        shape = (*self.values[reward.memorization].shape[1:], 2)
        if refs is None:
            return np.full(shape, np.nan)
        scale = Reward(reward, refs)
        lo, span = scale.memorization_scale()
        mem = (self.values[reward.memorization][task] - lo) / span
        if reward.memorization_floor:
            mem = np.maximum(mem, 0.0)
        q_full, q_span = scale.quality_scale()
        quality = (self.values[reward.quality][task] - q_full) / q_span
        return np.stack([mem, quality], axis=-1)

    def rewards(self, reward: RewardConfig, task: int, w: float) -> np.ndarray:
        """(masks, seeds, checkpoints) rewards at memorization weight ``w`` (quality ``1 - w``)."""
        return preference_reward(self.terms(reward, task), w)

    def complete(self, metric: str = "heldout_loss") -> np.ndarray:
        """(tasks,) whether every mask of seed 0 has its whole curve and the references exist."""
        values = self.values[metric][:, :, 0, :]
        return np.array(
            [self.references[t] is not None and not np.isnan(values[t]).any() for t in range(len(self.names))]
        )


def preference_reward(terms: np.ndarray, w: float) -> np.ndarray:
    """The reward of (..., 2) memorization and quality terms at memorization weight ``w`` (quality
    ``1 - w``): what every curve point and replayed recipe is ranked by."""
    return -(w * terms[..., 0] + (1 - w) * terms[..., 1])


def _as_dict(references: References | None) -> dict[str, Any] | None:
    return None if references is None else dataclasses.asdict(references)


def load_curves(cfg: Config, metrics: tuple[str, ...] | None = None) -> CurveTable:
    """Read every curve of ``cfg``'s suite (a curve suite: ``finetune.checkpoint_every`` set) from
    its tables and store; nothing is evaluated. ``metrics``: the metrics to keep (default: the
    reward's and the copy figures)."""
    every = cfg.finetune.checkpoint_every
    if not every:
        raise StoreError(
            "this config records no curves (finetune.checkpoint_every is unset); use a curve suite such "
            "as configs/bench3.yaml"
        )
    keep = metrics or (
        cfg.reward.memorization,
        cfg.reward.quality,
        "canary_copy_fraction",
        "near_copy_fraction",
        "extracted",
        "kid",
        "mia_auc_private",
        "mia_tpr_private",
    )
    evaluator = make_evaluator(cfg)
    for source in evaluator.tables:
        version = source.notes().get("provenance", {}).get("memrl_spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise StoreError(
                f"{source.path}: a curve table of spec version {version}, but this memrl reads version "
                f"{SPEC_VERSION}; rebuild it (python -m memrl.tables build --config ...) or install the "
                "memrl it was built with"
            )
    entries = suite(cfg)
    steps = np.arange(every, cfg.finetune.steps + 1, every)
    k = TaskContext.get(entries[0].cfg).space.k
    masks = [*curve_masks(k), FULL]
    seeds = (0, *NOISE_SEEDS)
    shape = (len(entries), len(masks), len(seeds), len(steps))
    values = {name: np.full(shape, np.nan) for name in keep}
    shares = np.full((*shape, k), np.nan)
    references: list[References | None] = []
    at_reference = np.flatnonzero(steps == REFERENCE_STEPS)
    noise_column = int(at_reference[0]) if len(at_reference) else len(steps) - 1
    for t, entry in enumerate(entries):
        for s, seed in enumerate(seeds):
            task_cfg = entry.cfg if seed == 0 else entry.cfg.with_changes({"finetune.seed": seed})
            ctx, whole = TaskContext.get(task_cfg), TaskContext.get(full_unet(task_cfg))
            specs = [ctx.spec([int(c) for c in m]) for m in masks[:-1]] + [whole.spec((1,) * whole.space.k)]
            for m, found in enumerate(evaluator.lookup_many([spec.hash for spec in specs])):
                for stored in (found.curve or []) if found is not None else []:
                    point = with_derived_metrics(stored)  # the reward's ratio at every checkpoint
                    c = int(point["step"]) // every - 1
                    for name in keep:
                        values[name][t, m, s, c] = point.get(name, math.nan)
                    if masks[m] != FULL:
                        shares[t, m, s, c] = point.get("grad_share", [math.nan] * k)
        ref = TaskContext.get(reference_config(entry.cfg))
        none, full = evaluator.lookup_many([ref.spec((0,) * k).hash, ref.spec((1,) * k).hash])
        references.append(
            References(none.metrics, full.metrics, _seed_noise(values, t, noise_column, keep))
            if none is not None and full is not None and none.ok and full.ok
            else None
        )
    return CurveTable(
        names=[e.name for e in entries],
        heldout=np.array([e.heldout for e in entries]),
        masks=masks,
        seeds=seeds,
        steps=steps,
        values=values,
        references=references,
        grad_share=shares,
        sources=[e.cfg.data.source for e in entries],
    )


def _seed_noise(
    values: dict[str, np.ndarray], t: int, column: int, keep: tuple[str, ...]
) -> dict[str, float]:
    """Each metric's seed standard deviation on task ``t``: over the masks stored with every seed,
    at checkpoint ``column`` (the reward's noise span; empty where no mask has every seed)."""
    out = {}
    for name in keep:
        last = values[name][t, :, :, column]  # (masks, seeds)
        full_rows = last[~np.isnan(last).any(axis=1)]
        if len(full_rows):
            out[name] = float(np.mean(np.std(full_rows, axis=1, ddof=1)))
    return out
