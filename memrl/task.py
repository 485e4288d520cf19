"""The evaluation service of one task: its references, reward, scores and descriptor.

:class:`Task` is what every caller uses (the Gymnasium env, the search baselines,
``apply_policy``, ``Policy.propose``, ``train_agent``): its config, its references (no fine-tune
and the mask of ones), its reward, ``score(mask)``, its seed noise (from the tables' noise
sample) and its descriptor. What a task's evaluations share lives in :mod:`memrl.context`; where
they run, in :mod:`memrl.evaluator`.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from memrl.config import Config, RewardConfig
from memrl.context import (  # noqa: F401  (re-exported: memrl.task was their home)
    TaskContext,
    TaskEntry,
    architecture_space,
    full_unet,
    resolve_task,
    suite,
    task_config,
)
from memrl.descriptor import describe, descriptor_key
from memrl.evaluator import Evaluator, make_evaluator  # noqa: F401  (re-exported)
from memrl.reward import TERMS, References, Reward
from memrl.search_space import SearchSpace
from memrl.spec import EvalSpec, Evaluation, spec_settings

__all__ = ["Mask", "NOISE_SEEDS", "Outcome", "Task", "noise_masks"]

log = logging.getLogger(__name__)

Mask = np.ndarray | Sequence[int]
"""A mask: one 0/1 per group of the search space."""

NOISE_SEEDS = (1, 2)
"""Extra fine-tune seeds of the tables' noise sample (seed 0 is the main table)."""


def noise_masks(k: int, n: int = 16, seed: int = 0) -> list[tuple[int, ...]]:
    """The noise sample's masks: none, all, every single group, then seeded random masks."""
    masks = [(0,) * k, (1,) * k] + [tuple(int(i == j) for i in range(k)) for j in range(k)]
    rng = np.random.default_rng(seed)
    every = list(itertools.product((0, 1), repeat=k))
    for i in rng.permutation(len(every)):
        if len(masks) >= n:
            break
        if every[i] not in masks:
            masks.append(every[i])
    return masks[:n]


@dataclass
class Outcome:
    """A mask scored on a task: reward, normalised terms and the raw evaluation."""

    mask: np.ndarray
    reward: float
    evaluation: Evaluation
    terms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Task:
    """The evaluation service of one task: config, references, reward, score a mask, descriptor.

    Args:
        cfg: the task's config (``data`` already set to this task).
        evaluator: where evaluations are looked up and run (:class:`memrl.evaluator.Evaluator`).
        name: a label; heldout: never trained on (kept to test transfer).
    """

    def __init__(self, cfg: Config, evaluator: Evaluator, name: str = "", heldout: bool = False) -> None:
        self.cfg, self.evaluator, self.name, self.heldout = cfg, evaluator, name, heldout
        self._references: References | None = None
        self._descriptor: np.ndarray | None = None

    @functools.cached_property
    def context(self) -> TaskContext:
        return TaskContext.get(self.cfg)

    @property
    def space(self) -> SearchSpace:
        return self.context.space

    def evaluate(self, mask: Mask) -> Evaluation:
        """The evaluation of ``mask`` (from a table or store, or run now)."""
        return self.evaluator.evaluate(self.context.spec(mask))

    def specs_with_references(self, masks: Sequence[Mask]) -> list[EvalSpec]:
        """The specs of the references and of ``masks``: what scoring them needs evaluated."""
        k = self.space.k
        return [self.context.spec(m) for m in (np.zeros(k, np.int8), np.ones(k, np.int8), *masks)]

    def prefetch(self, masks: Sequence[Mask]) -> None:
        """Evaluate ``masks`` and the references at once (concurrently on the Ray backend), so
        that scoring them afterwards only reads stored evaluations."""
        self.evaluator.evaluate_many(self.specs_with_references(masks))

    def references(self) -> References:
        """No fine-tune (mask of zeros) and every group (mask of ones); raises RuntimeError naming
        the failed one."""
        if self._references is None:
            k = self.space.k
            none, full = self.evaluate(np.zeros(k, np.int8)), self.evaluate(np.ones(k, np.int8))
            for label, ev in (("no fine-tune", none), ("mask of ones", full)):
                if not ev.ok:
                    raise RuntimeError(f"the reference evaluation ({label}) failed: {ev.error}")
            self._references = References(none.metrics, full.metrics, self.seed_noise())
        return self._references

    def reference_rewards(self, reward: RewardConfig | None = None) -> tuple[float, float]:
        """Rewards of no fine-tune and of the mask of ones (``reward``: a RewardConfig, default
        the config's)."""
        refs = self.references()
        fn = Reward(reward or self.cfg.reward, refs)
        return fn(refs.none), fn(refs.full)

    def noise_sample(self) -> dict[tuple[int, ...], list[Evaluation | None]]:
        """Each mask of the tables' noise sample with its stored evaluations, fine-tune seed 0 then
        :data:`NOISE_SEEDS` (None where not stored; looked up, never evaluated)."""
        k, fingerprints = self.space.k, self.context.fingerprints
        settings = [spec_settings(self.cfg.with_changes({"finetune.seed": s})) for s in NOISE_SEEDS]
        masks = noise_masks(k, min(2**k, 64))
        specs = [
            spec
            for mask in masks
            for spec in (self.context.spec(mask), *(EvalSpec(s, mask, fingerprints) for s in settings))
        ]
        found = self.evaluator.lookup_many([spec.hash for spec in specs])
        n = 1 + len(NOISE_SEEDS)
        return {mask: found[i * n : (i + 1) * n] for i, mask in enumerate(masks)}

    def seed_noise(self) -> dict[str, float]:
        """Each metric's seed standard deviation on this task, pooled over the masks of the
        tables' noise sample stored with two or more fine-tune seeds (empty when there are none)."""
        variances: dict[str, list[float]] = {}
        for found in self.noise_sample().values():
            runs = [ev.metrics for ev in found if ev is not None and ev.ok]
            if len(runs) < 2:
                continue
            for key in set.intersection(*(set(r) for r in runs)):
                values = np.array([r[key] for r in runs], dtype=float)
                if np.isfinite(values).all():
                    variances.setdefault(key, []).append(float(values.var(ddof=1)))
        return {key: float(np.sqrt(np.mean(v))) for key, v in variances.items()}

    def stored_reward(self, reward: RewardConfig | None = None) -> Reward | None:
        """The reward (``reward``: a RewardConfig, default the config's) from stored references
        only, or None when either reference is missing or failed (nothing is evaluated)."""
        k = self.space.k
        ends = (np.zeros(k, np.int8), np.ones(k, np.int8))
        refs = self.evaluator.lookup_many([self.context.spec(m).hash for m in ends])
        if any(ev is None or not ev.ok for ev in refs):
            return None
        none, full = refs
        assert none is not None and full is not None
        return Reward(reward or self.cfg.reward, References(none.metrics, full.metrics, self.seed_noise()))

    def stored_terms(self, masks: np.ndarray, reward: RewardConfig | None = None) -> np.ndarray:
        """(len(masks), 3) the :data:`~memrl.reward.TERMS` of each stored mask (NaN where a mask
        or a reference is missing or failed; looked up, never evaluated)."""
        out = np.full((len(masks), len(TERMS)), np.nan)
        reward_fn = self.stored_reward(reward)
        if reward_fn is None:
            return out
        found = self.evaluator.lookup_many([self.context.spec(mask).hash for mask in masks])
        for i, ev in enumerate(found):
            if ev is not None and ev.ok:
                terms = reward_fn.terms(ev.metrics)
                out[i] = [terms[key] for key in TERMS]
        return out

    def score(self, mask: Mask, reward: RewardConfig | None = None) -> Outcome:
        """Reward (``reward``: a RewardConfig, default the config's) and terms of ``mask``.

        A failed evaluation or reference scores ``reward.failure_penalty`` with the reason in
        ``error``.
        """
        reward_cfg = reward or self.cfg.reward
        mask = self.space.validate(mask)
        evaluation = self.evaluate(mask)
        error = evaluation.error if not evaluation.ok else None
        terms: dict[str, float] = {}
        if error is None:
            try:
                reward_fn = Reward(reward_cfg, self.references())
            except RuntimeError as exc:
                error = str(exc)
            else:
                terms = reward_fn.terms(evaluation.metrics)
                return Outcome(mask, reward_fn(evaluation.metrics), evaluation, terms)
        return Outcome(mask, float(reward_cfg.failure_penalty), evaluation, terms, error)

    def descriptor_key(self) -> str:
        return descriptor_key(self.context.fingerprints)

    def descriptor(self) -> np.ndarray:
        """The dataset descriptor (stored beside the evaluations, so replay computes nothing)."""
        if self._descriptor is None:
            key = self.descriptor_key()
            found = self.evaluator.descriptor(key)
            if found is None:
                found = describe(self.context)
                self.evaluator.put_descriptor(key, {"name": self.name, **self.cfg.data.__dict__}, found)
            self._descriptor = found
        return self._descriptor.copy()
