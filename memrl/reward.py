"""Scalarised reward from memorization and quality, normalised against two references.

For each dataset two reference evaluations are run once (and cached in the store): the base model
without fine-tuning (mask of zeros) and full fine-tuning (mask of ones). Then

* memorization term  ``m = max(0, (mem - mem_none) / span)`` with
  ``span = max(|mem_full - mem_none|, c * sigma)``: 0 memorizes as little as the base model, 1 as
  much as full fine-tuning. ``mem`` is ``reward.memorization``, by default
  ``canary_log_loss_ratio`` (log of held-out over canary denoising loss), so ``mem - mem_none``
  is how much more, relatively, fine-tuning lowered the canaries' loss than held-out images'.
  ``sigma`` is the seed standard deviation of the memorization metric on
  the task (from the tables' noise sample; 0 when unknown) and ``c = reward.noise_span`` (3: the
  classic limit of detection, three standard deviations of a blank). Where fine-tuning induces
  less memorization than seed noise can resolve, the span stays at the noise level instead of
  dividing noise by a tiny number. The floor at 0 (``reward.memorization_floor``): a mask cannot
  memorize less than a model that never saw the canaries.
* quality term  ``q = (qual - qual_full) / q_span`` with ``q_span = max(|qual_none - qual_full|,
  c * sigma_q)`` (lower ``qual`` is better, so lower ``q`` always is): 0 is as good as full
  fine-tuning; no fine-tuning is at 1 where fine-tuning improves quality, at -1 where it harms it
  (a base model that already draws the data well, fine-tuned on a set dominated by duplicates);
  ``sigma_q`` is the quality metric's seed standard deviation, as for memorization;

and ``reward = -(w_m * m + w_q * q + w_p * trainable_fraction)``. A mask that keeps full
fine-tuning's quality while memorizing like the base model scores 0; no fine-tune scores
``-w_q`` where fine-tuning improves quality, and the mask of ones ``-w_m`` where its memorization
is above the noise level.
:data:`REWARD_VERSION` 4 is this reward. Version 3 divided by the signed ``qual_none - qual_full``
and had no noise span for quality: where fine-tuning harms quality it rewarded the worse held-out
loss (no task of the 150-step table, where every fine-tune improved quality; most training tasks of
MemControl-Bench v3, where base model v2 already knows the source). Version 2 measured
memorization by the plain ``canary_loss_gap`` (held-out minus canary loss;
``reward.memorization=canary_loss_gap``): on suite tasks whose canaries happened to be easy for
the base model, every fine-tune shrank that gap with the losses themselves, so all 128 masks scored
0 memorization even where the canaries' loss fell relatively more than held-out images'
(bench/README.md). Version 1 is version 2 without the
floor and the noise span (``reward.memorization_floor=false reward.noise_span=0``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from memrl.config import RewardConfig

__all__ = [
    "PREFERENCE_FIELDS",
    "REWARD_VERSION",
    "References",
    "Reward",
    "TERMS",
    "draw_preference",
    "pareto_front",
    "preference_of",
    "reward_version",
    "with_preference",
]

PREFERENCE_FIELDS = ("memorization_weight", "quality_weight", "param_weight")
TERMS = ("memorization_term", "quality_term", "param_term")
"""The normalised terms of :meth:`Reward.terms`, in the order of :data:`PREFERENCE_FIELDS`."""
"""The reward weights that make up a preference (appended to the policy's observation)."""


def preference_of(cfg: RewardConfig) -> np.ndarray:
    """The weights of ``cfg`` as a float32 vector in :data:`PREFERENCE_FIELDS` order."""
    return np.array([getattr(cfg, f) for f in PREFERENCE_FIELDS], dtype=np.float32)


def with_preference(cfg: RewardConfig, preference: np.ndarray | list[float]) -> RewardConfig:
    """``cfg`` with its weights replaced by ``preference`` (memorization, quality, param)."""
    values = [float(v) for v in preference]
    if len(values) != len(PREFERENCE_FIELDS) or not all(np.isfinite(v) and v >= 0 for v in values):
        raise ValueError(
            f"a preference is {len(PREFERENCE_FIELDS)} non-negative weights {PREFERENCE_FIELDS}, got {values}"
        )
    w_mem, w_quality, w_param = values
    return dataclasses.replace(cfg, memorization_weight=w_mem, quality_weight=w_quality, param_weight=w_param)


def draw_preference(cfg: RewardConfig, mode: str, rng: np.random.Generator) -> np.ndarray:
    """A preference for one episode: ``fixed`` (the config's weights) or ``uniform`` (memorization
    weight from U[0, 1], quality weight 1 minus it, the config's parameter weight)."""
    if mode == "fixed":
        return preference_of(cfg)
    w = float(rng.uniform(0.0, 1.0))
    return np.array([w, 1.0 - w, cfg.param_weight], dtype=np.float32)


_EPS = 1e-6
REWARD_VERSION = 4
"""The reward's definition (policy cards record it): 2 adds the noise span and the floor to 1, 3
measures memorization by the log loss ratio instead of the loss gap, 4 makes the quality term
monotone (its span unsigned, at least the noise span)."""


def reward_version(cfg: RewardConfig) -> int:
    """The version ``cfg`` defines: 1 without the floor and the noise span, 2 with them on the
    loss gap, :data:`REWARD_VERSION` otherwise."""
    if not (cfg.memorization_floor or cfg.noise_span > 0):
        return 1
    return 2 if cfg.memorization == "canary_loss_gap" else REWARD_VERSION


@dataclass
class References:
    none: dict[str, float]
    """Metrics of the base model without fine-tuning."""
    full: dict[str, float]
    """Metrics of full fine-tuning."""
    noise: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seed standard deviation of each metric on the task (empty when no noise sample exists)."""


class Reward:
    """Scalarise an evaluation's metrics (see the module docstring)."""

    def __init__(self, cfg: RewardConfig, refs: References) -> None:
        for key in (cfg.memorization, cfg.quality):
            if key not in refs.none or key not in refs.full:
                raise ValueError(
                    f"reward term {key!r} is not a metric of the reference evaluations; "
                    f"choose one of {sorted(refs.full)}"
                )
        self.cfg, self.refs = cfg, refs

    def memorization_scale(self) -> tuple[float, float]:
        """(no fine-tune's value, span) of the memorization metric (see the module docstring)."""
        key = self.cfg.memorization
        lo, hi = self.refs.none[key], self.refs.full[key]
        noise = self.cfg.noise_span * self.refs.noise.get(key, 0.0)
        return lo, max(abs(hi - lo), noise, _EPS)

    def quality_scale(self) -> tuple[float, float]:
        """(full fine-tuning's value, unsigned span) of the quality metric (the module docstring)."""
        key = self.cfg.quality
        q_none, q_full = self.refs.none[key], self.refs.full[key]
        noise = self.cfg.noise_span * self.refs.noise.get(key, 0.0)
        return q_full, max(abs(q_none - q_full), noise, _EPS)

    def terms(self, metrics: dict[str, float]) -> dict[str, float]:
        """The normalised terms: memorization (0 none .. 1 full) and quality cost (0 full, lower better)."""
        c = self.cfg
        lo, span = self.memorization_scale()
        mem = (metrics[c.memorization] - lo) / span
        if c.memorization_floor:
            mem = max(mem, 0.0)
        q_full, q_span = self.quality_scale()
        quality = (metrics[c.quality] - q_full) / q_span
        return {
            "memorization_term": float(mem),
            "quality_term": float(quality),
            "param_term": float(metrics.get("trainable_fraction", 0.0)),
        }

    def __call__(self, metrics: dict[str, float]) -> float:
        t = self.terms(metrics)
        c = self.cfg
        value = -(
            c.memorization_weight * t["memorization_term"]
            + c.quality_weight * t["quality_term"]
            + c.param_weight * t["param_term"]
        )
        return float(value) if np.isfinite(value) else float(c.failure_penalty)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (rows, every column to be minimised) no other point dominates."""
    points = np.asarray(points, dtype=float)
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        keep[i] = not dominated.any()
    return keep
