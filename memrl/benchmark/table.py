"""The MemControl-Bench tables as dense arrays, and the folds every method is judged on."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from memrl.config import Config
from memrl.errors import MemrlError
from memrl.reward import References, Reward

TERMS = ("memorization_term", "quality_term", "param_term")
PREFERENCES = (0.25, 0.5, 0.75)
"""Memorization weights of the evaluation preferences (quality weight 1 minus it)."""
BUDGETS = (4, 8, 16, 32)


@dataclass
class BenchTable:
    """The tables of a suite as dense arrays (NaN where a mask is missing or failed)."""

    names: list[str]
    heldout: np.ndarray
    masks: np.ndarray
    """(M, K) every mask of the space, in binary counting order."""
    terms: np.ndarray
    """(T, M, 3) memorization, quality and parameter terms of every task and mask."""
    descriptors: np.ndarray
    """(T, D) task descriptors."""
    param_weight: float = 0.0

    def rewards(self, w: float) -> np.ndarray:
        """(T, M) rewards for memorization weight ``w`` (quality weight 1 - w)."""
        weights = np.array([w, 1.0 - w, self.param_weight])
        return -(self.terms @ weights)

    def regret(self, w: float) -> np.ndarray:
        """(T, M) regret: 0 = the task's best stored mask, 1 = its worst."""
        r = self.rewards(w)
        best = np.nanmax(r, axis=1, keepdims=True)
        worst = np.nanmin(r, axis=1, keepdims=True)
        return (best - r) / np.maximum(best - worst, 1e-9)

    def preference(self, w: float) -> np.ndarray:
        return np.array([w, 1.0 - w, self.param_weight], dtype=np.float32)

    def digest(self, tasks: list[int]) -> str:
        """A fingerprint of ``tasks``' stored terms and descriptors."""
        data = np.concatenate([self.terms[tasks].ravel(), self.descriptors[tasks].ravel()])
        return hashlib.sha256(np.ascontiguousarray(data, dtype=np.float64).tobytes()).hexdigest()[:16]

    def complete(self) -> list[int]:
        """The tasks whose every mask is stored."""
        return [t for t in range(len(self.names)) if np.isfinite(self.terms[t, :, 0]).all()]


def load_table(cfg: Config) -> BenchTable:
    """Read every (task, mask) of ``cfg``'s suite from its tables and store (nothing is evaluated)."""
    from memrl.task import Task, make_evaluator, suite

    evaluator = make_evaluator(cfg)
    entries = suite(cfg)
    tasks = [Task(e.cfg, evaluator, e.name, e.heldout) for e in entries]
    k = tasks[0].space.k
    masks = np.array(list(itertools.product((0, 1), repeat=k)), dtype=np.int8)
    terms = np.full((len(tasks), len(masks), 3), np.nan)
    for t, task in enumerate(tasks):
        found = [evaluator.lookup(task.context.spec(m).hash) for m in masks]
        none, full = found[0], found[-1]
        if none is None or full is None or not (none.ok and full.ok):
            continue
        reward = Reward(cfg.reward, References(none.metrics, full.metrics))
        for i, ev in enumerate(found):
            if ev is not None and ev.ok:
                terms[t, i] = [reward.terms(ev.metrics)[key] for key in TERMS]
    descriptors = np.stack([t.descriptor() for t in tasks])
    return BenchTable(
        [t.name for t in tasks],
        np.array([t.heldout for t in tasks]),
        masks,
        terms,
        descriptors,
        cfg.reward.param_weight,
    )


def mask_index(mask: Any) -> int:
    """A mask's row in :attr:`BenchTable.masks` (binary counting order)."""
    return int("".join(str(int(v)) for v in mask), 2)


def best_regret(regret: np.ndarray, tried: list[int]) -> float:
    values = regret[tried]
    values = values[np.isfinite(values)]
    return float(values.min()) if len(values) else float("nan")


def folds(table: BenchTable) -> list[tuple[int, list[int]]]:
    """(test task, training tasks): leave-one-task-out over the complete training tasks, then each
    complete held-out task against all of them."""
    complete = table.complete()
    if len(complete) < 2:
        raise MemrlError(
            f"the tables hold {len(complete)} complete task(s) of {len(table.names)}; a transfer "
            "benchmark needs two or more: continue them with python -m memrl.tables build"
        )
    training = [t for t in complete if not table.heldout[t]]
    out = [(t, [u for u in training if u != t]) for t in training]
    out += [(t, training) for t in complete if table.heldout[t]]
    return [(test, train) for test, train in out if train]
