"""A suite's tables as dense arrays (:class:`BenchTable`, read by :func:`load_table`): every task's
terms for every mask, its noise sample and descriptor. Replay, the searchers on tables
(:class:`memrl.searchers.TableOracle`) and the research harness read them."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from memrl.config import Config
from memrl.reward import TERMS

__all__ = ["BenchTable", "best_regret", "load_table", "mask_index"]


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
    """(T, D) task descriptors (NaN for a task whose table is not complete)."""
    param_weight: float = 0.0
    noise_masks: np.ndarray | None = None
    """(N,) table indices of the noise sample's masks."""
    noise_terms: np.ndarray | None = None
    """(T, N, S, 3) terms of the noise masks with each fine-tune seed (seed 0 first; NaN where
    not stored)."""
    sources: list[str] | None = None
    """Each task's source (:func:`memrl.data.bundled.suite_source`); None: every task its own."""

    def rewards(self, w: float) -> np.ndarray:
        """(T, M) rewards for memorization weight ``w`` (quality weight 1 - w)."""
        weights = np.array([w, 1.0 - w, self.param_weight])
        return -(self.terms @ weights)

    def regret(self, w: float) -> np.ndarray:
        """(T, M) regret: 0 = the task's best stored mask, 1 = its worst (NaN where not stored)."""
        r = self.rewards(w)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of incomplete tasks
            best = np.nanmax(r, axis=1, keepdims=True)
            worst = np.nanmin(r, axis=1, keepdims=True)
            return (best - r) / np.maximum(best - worst, 1e-9)

    def noise_floor(self, w: float) -> np.ndarray:
        """(T,) each task's regret noise floor: the mean absolute difference in regret that the same
        mask shows between two fine-tune seeds (over the noise sample's masks and seed pairs;
        NaN where the task has no noise sample). A pick within it of the best is a hit."""
        out = np.full(len(self.names), np.nan)
        if self.noise_terms is None or self.noise_masks is None:
            return out
        r = np.where(np.isfinite(self.rewards(w)), self.rewards(w), -np.inf)
        best = r.max(axis=1)
        span = np.maximum(best - np.where(np.isfinite(r), r, np.inf).min(axis=1), 1e-9)
        weights = np.array([w, 1.0 - w, self.param_weight])
        regret = (best[:, None, None] + self.noise_terms @ weights) / span[:, None, None]  # (T, N, S)
        for t in range(len(self.names)):
            diffs = [
                abs(a - b)
                for row in regret[t]
                for i, a in enumerate(row)
                for b in row[i + 1 :]
                if np.isfinite(a) and np.isfinite(b)
            ]
            if diffs:
                out[t] = float(np.mean(diffs))
        return out

    def preference(self, w: float) -> np.ndarray:
        return np.array([w, 1.0 - w, self.param_weight], dtype=np.float32)

    def digest(self, tasks: list[int]) -> str:
        """A fingerprint of ``tasks``' stored terms, noise sample and descriptors."""
        noise = self.noise_terms[tasks].ravel() if self.noise_terms is not None else np.zeros(0)
        data = np.concatenate([self.terms[tasks].ravel(), noise, self.descriptors[tasks].ravel()])
        return hashlib.sha256(np.ascontiguousarray(data, dtype=np.float64).tobytes()).hexdigest()[:16]

    def complete(self) -> list[int]:
        """The tasks whose every mask is stored."""
        return [t for t in range(len(self.names)) if np.isfinite(self.terms[t, :, 0]).all()]


def load_table(cfg: Config) -> BenchTable:
    """Read every (task, mask) of ``cfg``'s suite from its tables and store (nothing is evaluated),
    with the reward of ``cfg.reward`` (its noise span from each task's noise sample) and each
    complete task's descriptor."""
    from memrl.data.bundled import suite_source
    from memrl.task import NOISE_SEEDS, Task, make_evaluator, suite

    evaluator = make_evaluator(cfg)
    entries = suite(cfg)
    tasks = [Task(e.cfg, evaluator, e.name, e.heldout) for e in entries]
    k = tasks[0].space.k
    masks = np.array(list(itertools.product((0, 1), repeat=k)), dtype=np.int8)
    terms = np.stack([task.stored_terms(masks) for task in tasks])
    noisy: list[int] = []
    noise = np.full((len(tasks), min(len(masks), 64), 1 + len(NOISE_SEEDS), 3), np.nan)
    for t, task in enumerate(tasks):
        reward = task.stored_reward()
        sample = task.noise_sample()
        noisy = [mask_index(m) for m in sample]
        if reward is None:
            continue
        for j, found in enumerate(sample.values()):
            for s, ev in enumerate(found):
                if ev is not None and ev.ok:
                    noise[t, j, s] = [reward.terms(ev.metrics)[key] for key in TERMS]
    complete = np.isfinite(terms[:, :, 0]).all(axis=1)
    found_descriptors = {t: task.descriptor() for t, task in enumerate(tasks) if complete[t]}
    width = len(next(iter(found_descriptors.values()))) if found_descriptors else 0
    descriptors = np.full((len(tasks), width), np.nan)
    for t, d in found_descriptors.items():
        descriptors[t] = d
    return BenchTable(
        [t.name for t in tasks],
        np.array([t.heldout for t in tasks]),
        masks,
        terms,
        descriptors,
        cfg.reward.param_weight,
        np.array(noisy),
        noise[:, : len(noisy)],
        [suite_source(e.cfg.data.source) for e in entries],
    )


def mask_index(mask: Any) -> int:
    """A mask's row in :attr:`BenchTable.masks` (binary counting order)."""
    return int("".join(str(int(v)) for v in mask), 2)


def best_regret(regret: np.ndarray, tried: list[int]) -> float:
    values = regret[tried]
    values = values[np.isfinite(values)]
    return float(values.min()) if len(values) else float("nan")
