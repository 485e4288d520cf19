"""What a policy observes in each episode mode, defined once for the env and for :class:`Policy`.

* ``mask``: one step; the observation is the dataset descriptor and the preference (the *head*).
* ``sequential``: one step per group; the head, the partial mask and a one-hot of the group.
* ``search``: a budget of ``B`` fine-tunes on one task and preference; each step's action is a
  mask (its index in counting order), evaluated, and the next observation scores every mask of the
  space (:class:`SearchHistory`): what the training tasks' tables say about it for data like this
  (:mod:`memrl.prior`), whether it was tried, and a posterior from every result so far. Nothing
  from the searched task's own table: what a user running the search would know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memrl.gp import calibrated_posterior, expected_improvement, posterior
from memrl.prior import PRIOR_FEATURES, agreement_regret, all_masks, portfolio_regret
from memrl.reward import PREFERENCE_FIELDS

__all__ = [
    "CANDIDATE_FEATURES",
    "CLIP",
    "MAX_SEARCH_GROUPS",
    "PORTFOLIO_STEPS",
    "SEARCH_GLOBALS",
    "SearchHistory",
    "TRIED",
    "head",
    "portfolio_step",
    "search_observation_size",
    "sequential_finished",
    "sequential_observation",
]


def head(descriptor: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """The part every observation starts with: the dataset descriptor, then the preference."""
    return np.concatenate([descriptor, preference]).astype(np.float32)


def sequential_observation(head_part: np.ndarray, mask: np.ndarray, position: int) -> np.ndarray:
    """Sequential mode: the head, the partial mask and a one-hot of the group decided next."""
    k = len(mask)
    onehot = np.zeros(k, dtype=np.float32)
    if position < k:
        onehot[position] = 1
    return np.concatenate([head_part, mask.astype(np.float32), onehot])


def sequential_finished(mask: np.ndarray, position: int, max_groups: int | None) -> bool:
    """Whether a sequential episode is over: every group decided, or ``max_groups`` unfrozen."""
    return position >= len(mask) or (max_groups is not None and int(mask.sum()) >= max_groups)


MAX_SEARCH_GROUPS = 10
"""Search mode scores every mask of the space at each step: at most 2**10 candidates."""
SEARCH_GLOBALS = (
    *PREFERENCE_FIELDS,
    "budget_left",
    "tried_share",
    "best_so_far",
    "has_tried",
    "portfolio_step",
)
"""The episode-wide values a search observation starts with."""
CANDIDATE_FEATURES = (
    *PRIOR_FEATURES,
    "tried",
    "posterior_mean",
    "posterior_std",
    "expected_improvement",
    "distance_to_best",
    "size",
    "calibrated_mean",
    "calibrated_improvement",
    "portfolio_score",
)
"""What a search observation shows about each candidate mask (one row per mask, counting order)."""
TRIED = CANDIDATE_FEATURES.index("tried")
CLIP = 10.0
"""Bound of the calibrated features (results' spread units; the observation space's bound)."""
PORTFOLIO_STEPS = 2
"""Fine-tunes after the first that ``gp-prior`` (and so the untrained search policy) picks by
:func:`memrl.prior.portfolio_regret` instead of expected improvement: the mask that best
completes the tried ones for the training tasks that agree with the results so far. Chosen among
0-3 with the lowest mean regret over 1-8 fine-tunes, leave one task out and leave one source out
averaged, on the 14 training tasks of 2026-12-02 (0.0268 against 0.0273 for 0); see bench/README.md."""


def portfolio_step(tried: int, sources: tuple[np.ndarray, np.ndarray] | None) -> bool:
    """Whether the next pick, after ``tried`` fine-tunes, is a portfolio step (:data:`PORTFOLIO_STEPS`;
    never without training tasks' ``sources``)."""
    return sources is not None and len(sources[1]) > 0 and 1 <= tried <= PORTFOLIO_STEPS


def search_observation_size(k: int) -> int:
    """Length of a search-mode observation for ``k`` groups."""
    return len(SEARCH_GLOBALS) + 2**k * len(CANDIDATE_FEATURES)


@dataclass
class SearchHistory:
    """The results a search has seen on one task, and what the next decision observes.

    Rewards are the task's normalised rewards for the episode's preference. ``baseline`` is the
    better reference's reward (no fine-tune or the mask of ones, which every search evaluates
    first to normalise rewards); the env's reward for a step is the change of the best reward
    among the masks tried so far (the first step: its reward minus ``baseline``), so an episode's
    rewards sum to its best tried mask's reward minus ``baseline``.

    Args:
        k: groups of the search space; budget: the masks the search may evaluate.
        references: the rewards of no fine-tune and of the mask of ones, when known (they enter
            the posterior as observations, but count as tried only when the search picks them).
        sources: the training tasks' regret and weights
            (:meth:`memrl.prior.TransferPrior.weighted_sources`); with any result known (the
            references included), the calibrated posterior's prior is their
            :func:`~memrl.prior.agreement_regret` instead of the fixed ``transfer_regret``, and
            the picks after the first :data:`PORTFOLIO_STEPS` are scored by
            :func:`~memrl.prior.portfolio_regret`.
    """

    k: int
    budget: int
    references: tuple[float, float] | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terms: list[tuple[float, float]] = field(default_factory=list)
    sources: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def baseline(self) -> float:
        return max(self.references) if self.references is not None else 0.0

    def add(self, mask: np.ndarray, reward: float, memorization: float, quality: float) -> float:
        """Record one result; returns the change of the best tried reward (the env's reward)."""
        before = self.best_reward
        self.masks.append(np.asarray(mask, dtype=np.int8).copy())
        self.rewards.append(float(reward) if np.isfinite(reward) else -np.inf)
        self.terms.append((float(memorization), float(quality)))
        after = self.best_reward
        return float(np.clip(after - before, -2.0, 2.0))

    @property
    def best_reward(self) -> float:
        """The best reward among the masks tried (``baseline`` before any)."""
        return max(self.rewards) if self.rewards else self.baseline

    @property
    def done(self) -> bool:
        return len(self.masks) >= self.budget

    def best_index(self) -> int | None:
        if not self.rewards or max(self.rewards) == -np.inf:
            return None
        return int(np.argmax(self.rewards))

    def observation(
        self, preference: np.ndarray, prior: np.ndarray, zero_history: bool = False
    ) -> np.ndarray:
        """:data:`SEARCH_GLOBALS`, then one row of :data:`CANDIDATE_FEATURES` per mask: the
        ``prior`` (2**k, 4) from :class:`memrl.prior.TransferPrior`, whether it was tried, the
        posterior of its reward given every result so far and the references (mean and expected
        improvement relative to the best so far, in units of the results' spread), its Hamming
        distance to the best tried mask, its size, and the mean and improvement of
        :func:`calibrated_posterior` (the prior's ``transfer_regret`` as the posterior's mean,
        re-weighted by agreement with the results and references when ``sources`` is set; relative
        to the best reward known, references included, as the ``gp-prior`` baseline scores them;
        with nothing known, the mean is minus the prior's ``transfer_regret`` and the improvement 0),
        and at a portfolio step (:func:`portfolio_step`, the global ``portfolio_step`` 1) the
        :func:`~memrl.prior.portfolio_regret` of adding it, below the best candidate's, in units of
        the candidates' spread (0 for the best; 0 everywhere at other steps).
        ``zero_history`` shows every candidate as if nothing had been observed, except which were
        tried (an ablation: does it use feedback?)."""
        candidates = all_masks(self.k)
        m = len(candidates)
        tried = np.zeros(m)
        index = {tuple(c): i for i, c in enumerate(candidates.tolist())}
        tried_index = [index[tuple(int(v) for v in mask)] for mask in self.masks]
        tried[tried_index] = 1
        mean, std = np.zeros(m), np.ones(m)
        distance = np.ones(m)
        calibrated, calibrated_ei = -np.asarray(prior[:, 0], dtype=float), np.zeros(m)  # nothing known
        portfolio = np.zeros(m)
        at_portfolio = not zero_history and portfolio_step(len(self.masks), self.sources)
        best_rel, has_tried = 0.0, float(bool(self.masks))
        if not zero_history:
            results: dict[int, float] = {}  # candidate index -> reward, each mask once
            if self.references is not None:
                results = {0: self.references[0], m - 1: self.references[1]}
            for i, r in zip(tried_index, self.rewards):
                if np.isfinite(r):
                    results.setdefault(i, r)
            incumbent = self.best_reward if np.isfinite(self.best_reward) else self.baseline
            if results:
                seen = list(results)
                y = np.array(list(results.values()), dtype=float)
                scale = max(float(y.std()), 0.05) if len(y) > 1 else 1.0
                centre = float(y.mean())
                mu, std = posterior(candidates[seen], (y - centre) / scale, candidates)
                mean = np.clip(mu + (centre - incumbent) / scale, -5, 5)
                # the calibrated posterior is gp-prior's: its incumbent is the best reward known
                known = float(y.max())
                prior_regret = np.asarray(prior[:, 0], dtype=float)
                if self.sources is not None and len(self.sources[1]):
                    prior_regret = np.nan_to_num(agreement_regret(*self.sources, seen, y), nan=1.0)
                c_mean, c_std, c_scale = calibrated_posterior(prior_regret, seen, y, candidates)
                calibrated = np.clip((c_mean - known) / c_scale, -CLIP, CLIP)
                calibrated_ei = np.clip(expected_improvement(c_mean, c_std, known) / c_scale, 0, CLIP)
            if at_portfolio:
                assert self.sources is not None  # portfolio_step checked it
                values = np.array(list(results.values()), dtype=float)
                regret = portfolio_regret(*self.sources, tried_index, list(results), values)
                portfolio = np.clip((regret.min() - regret) / max(float(regret.std()), 1e-9), -CLIP, 0)
            best = self.best_index()
            if best is not None:
                distance = np.abs(candidates - self.masks[best]).sum(axis=1) / self.k
                best_rel = float(np.clip(self.best_reward - self.baseline, -2, 2))
        improvement = np.clip(expected_improvement(mean, std, 0.0), 0, 5)
        rows = np.column_stack(
            [
                prior,
                tried,
                mean,
                std,
                improvement,
                distance,
                candidates.sum(axis=1) / self.k,
                calibrated,
                calibrated_ei,
                portfolio,
            ]
        )
        scalars = [
            *np.asarray(preference, dtype=float),
            (self.budget - len(self.masks)) / max(self.budget, 1),
            len(self.masks) / max(self.budget, 1),
            best_rel,
            has_tried,
            float(at_portfolio),
        ]
        return np.concatenate([scalars, rows.ravel()]).astype(np.float32)
