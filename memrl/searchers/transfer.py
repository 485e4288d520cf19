"""Searchers that transfer from the training tasks' tables (a :class:`~memrl.prior.TransferPrior`):
zero-shot lists (single best, portfolio, nearest and k-nearest task, gradient top-g, regression)
and the Bayesian optimisation whose prior mean is what transfers (``gp-prior``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memrl.descriptor import family_slices
from memrl.episode import portfolio_step
from memrl.errors import ConfigError
from memrl.gp import best_candidate, calibrated_posterior, expected_improvement
from memrl.prior import KNN, TransferPrior, agreement_regret, all_masks, portfolio_regret
from memrl.searchers.base import History, Knowledge, Result, Trial
from memrl.searchers.basic import ListSearcher, trials_of
from memrl.table import mask_index

__all__ = [
    "GPPriorSearcher",
    "gradient_top_g",
    "knn_tasks",
    "nearest_task",
    "nearest_task_masks",
    "portfolio",
    "regression",
    "regression_model",
    "single_best",
    "single_best_reward",
]

REGRESSION_ITERATIONS = 50
REGRESSION_LEARNING_RATE = 0.03
"""The regression's boosting settings, as ``python -m research.benchmark tune --method regression``
chose them on the training tasks (bench/results/benchmark/tune-regression.md, 2026-12-01, 8
tasks: 50 trees at 0.03, mean regret over 1-4 fine-tunes 0.185; on 7 tasks it had chosen 50 at
0.1, 0.056, against 0.099 for the 200 used before)."""


def ranked(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` lowest finite ``scores`` (ties by index)."""
    order = np.argsort(np.where(np.isfinite(scores), scores, np.inf), kind="stable")
    return [int(i) for i in order[:n] if np.isfinite(scores[i])]


def _prior(knowledge: Knowledge, name: str) -> TransferPrior:
    if knowledge.prior is None or knowledge.prior.size == 0:
        raise ConfigError(
            f"searcher {name!r} transfers from training tasks' tables and none were given: pass a "
            "search policy (--policy), whose prior holds them, or pick random, tpe, gp or nsga2"
        )
    return knowledge.prior


def _descriptor(knowledge: Knowledge, name: str) -> np.ndarray:
    if knowledge.descriptor is None:
        raise ConfigError(f"searcher {name!r} needs the dataset's descriptor")
    return knowledge.descriptor


def _listed(indices: list[int], knowledge: Knowledge) -> ListSearcher:
    return ListSearcher(trials_of(indices, knowledge.k))


def single_best(knowledge: Knowledge) -> ListSearcher:
    """The mask with the lowest mean normalised regret over the training tasks (masks missing
    anywhere skipped)."""
    regret = _prior(knowledge, "single-best").regret(knowledge.preference)
    return _listed(ranked(regret.mean(axis=0), 1), knowledge)


def single_best_reward(knowledge: Knowledge) -> ListSearcher:
    """The mask with the best mean *raw* reward over the training tasks (tasks with wide reward
    ranges dominate it; kept for comparison with the first benchmark)."""
    prior = _prior(knowledge, "single-best-reward")
    rewards = -(prior.terms @ np.asarray(knowledge.preference, dtype=float))
    return _listed(ranked(-rewards.mean(axis=0), 1), knowledge)


def portfolio(knowledge: Knowledge) -> ListSearcher:
    """A static portfolio built greedily on the training tasks (as Auto-sklearn 2 builds its
    portfolios): each next mask is the one that most lowers the mean over training tasks of the
    best regret among the masks chosen so far."""
    regret = _prior(knowledge, "portfolio").regret(knowledge.preference)
    chosen: list[int] = []
    best = np.full(len(regret), np.inf)
    for _ in range(min(knowledge.budget, regret.shape[1])):
        candidate = np.minimum(best[:, None], regret).mean(axis=0)
        candidate[chosen] = np.inf
        picks = ranked(candidate, 1)
        if not picks:
            break
        chosen.append(picks[0])
        best = np.minimum(best, regret[:, picks[0]])
    return _listed(chosen, knowledge)


def nearest_task_masks(knowledge: Knowledge, n: int) -> list[int]:
    """The ``n`` best masks (indices) of the training task nearest to this dataset (descriptor
    distance, features standardised over the training tasks)."""
    prior = _prior(knowledge, "nearest-task")
    distances = prior.distances(_descriptor(knowledge, "nearest-task"), list(range(prior.size)))
    nearest = int(np.argmin(distances))
    return ranked(prior.regret(knowledge.preference)[nearest], n)


def nearest_task(knowledge: Knowledge) -> ListSearcher:
    """:func:`nearest_task_masks` for the whole budget."""
    return _listed(nearest_task_masks(knowledge, knowledge.budget), knowledge)


def knn_tasks(knowledge: Knowledge) -> ListSearcher:
    """The masks with the lowest regret averaged over the :data:`~memrl.prior.KNN` nearest
    training tasks, weighted by inverse descriptor distance."""
    prior = _prior(knowledge, "knn-tasks")
    regret = prior.knn_regret(_descriptor(knowledge, "knn-tasks"), knowledge.preference, KNN)
    return _listed(ranked(regret, knowledge.budget), knowledge)


def gradient_top_g(knowledge: Knowledge) -> ListSearcher:
    """Gradient-based parameter selection as a zero-shot rule (GPS, Zhang et al. CVPR 2024): the
    ``g`` groups with the largest base-model gradient per parameter on the private set (from the
    descriptor), ``g`` chosen as the count with the lowest mean regret on the training tasks."""
    prior, k = _prior(knowledge, "gradient-top-g"), knowledge.k
    gradient = family_slices(k)["gradient"]
    regret = prior.regret(knowledge.preference)

    def mask_of(descriptor: np.ndarray, g: int) -> np.ndarray:
        mask = np.zeros(k, dtype=np.int8)
        mask[np.argsort(-descriptor[gradient][:k], kind="stable")[:g]] = 1
        return mask

    mean = [
        np.mean([regret[s, mask_index(mask_of(prior.descriptors[s], g))] for s in range(prior.size)])
        for g in range(k + 1)
    ]
    return ListSearcher([Trial(mask_of(_descriptor(knowledge, "gradient-top-g"), int(np.nanargmin(mean))))])


def regression_model(
    prior: TransferPrior,
    seed: int,
    param_weight: float = 0.0,
    iterations: int = REGRESSION_ITERATIONS,
    learning_rate: float = REGRESSION_LEARNING_RATE,
) -> Any:
    """A regression from (descriptor, preference, mask) to reward fitted on the training tasks'
    rows at 11 memorization weights (gradient boosting: ``iterations`` trees at ``learning_rate``)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    xs, ys = [], []
    for s in range(prior.size):
        for weight in np.linspace(0, 1, 11):
            preference = _preference(weight, param_weight)
            r = -(prior.terms[s] @ np.array([weight, 1.0 - weight, param_weight]))
            keep = np.isfinite(r)
            xs.append(_regression_features(prior.descriptors[s], preference, prior.terms.shape[1])[keep])
            ys.append(r[keep])
    model = HistGradientBoostingRegressor(
        random_state=seed,
        max_iter=iterations,
        learning_rate=learning_rate,
        early_stopping=False,  # "auto" turns it on past 10,000 rows (8 tasks): a fit of another kind
    )
    return model.fit(np.concatenate(xs), np.concatenate(ys))


def _preference(w: float, param_weight: float) -> np.ndarray:
    return np.array([w, 1.0 - w, param_weight], dtype=np.float32)


def _regression_features(descriptor: np.ndarray, preference: np.ndarray, masks: int) -> np.ndarray:
    k = int(np.log2(masks))
    d = np.repeat(np.asarray(descriptor)[None], masks, 0)
    p = np.repeat(preference[None], masks, 0)
    return np.concatenate([d, p, all_masks(k)], axis=1)


def regression(knowledge: Knowledge) -> ListSearcher:
    """The masks of highest reward predicted by :func:`regression_model` (fitted once per set of
    training tasks: ``knowledge.fitted["regression"]``, else here)."""
    prior = _prior(knowledge, "regression")
    param_weight = float(knowledge.preference[2])
    model = knowledge.fitted.get("regression") or regression_model(prior, knowledge.seed, param_weight)
    preference = _preference(knowledge.memorization_weight, param_weight)
    features = _regression_features(_descriptor(knowledge, "regression"), preference, 2**knowledge.k)
    predicted = model.predict(features)
    if knowledge.available is not None:
        missing = np.ones(len(predicted), dtype=bool)
        missing[knowledge.available] = False
        predicted[missing] = np.nan
    return _listed(ranked(-predicted, knowledge.budget), knowledge)


class GPPriorSearcher:
    """Bayesian optimisation whose prior mean is what transfers (no learning): the search policy's
    :func:`~memrl.gp.calibrated_posterior` (an affine map from the training tasks' regret,
    weighted by descriptor distance (:meth:`~memrl.prior.TransferPrior.weighted_sources`), to this
    task's reward, and a Gaussian process on the residuals, refitted after every result); the
    first pick is the best predicted mask, the next :data:`~memrl.episode.PORTFOLIO_STEPS` the
    best completion of the tried ones as a portfolio (:func:`~memrl.prior.portfolio_regret`), each
    later one the largest expected improvement over the best so far; ties go to the lowest prior
    regret, and the training tasks are re-weighted by how well they order the results so far
    (:func:`~memrl.prior.agreement_weights`), the references' included. The references (no
    fine-tune, the mask of ones) are observed first, so even the first pick knows which training
    tasks order them as this one does."""

    def __init__(self, knowledge: Knowledge) -> None:
        prior = _prior(knowledge, "gp-prior")
        self.sources = prior.weighted_sources(_descriptor(knowledge, "gp-prior"), knowledge.preference)
        self.transfer = np.nan_to_num(agreement_regret(*self.sources, [], np.zeros(0)), nan=1.0)
        self.candidates = all_masks(knowledge.k)
        self.available = np.zeros(len(self.candidates), dtype=bool)
        self.available[knowledge.available if knowledge.available is not None else slice(None)] = True

    def ask(self, history: History) -> Trial | None:
        m = len(self.candidates)
        tried = [mask_index(t.mask) for t in [*history.trials, *history.pending]]
        if self.available.sum() <= len(set(tried)):
            return None
        known = {}
        for index, value in zip((0, m - 1), history.references or (np.nan, np.nan)):
            known[index] = value
        for trial, result in zip(history.trials, history.results):
            known.setdefault(mask_index(trial.mask), result.reward)
        order = dict.fromkeys([0, m - 1, *tried])
        seen = [i for i in order if i in known and np.isfinite(known[i]) and self.available[i]]
        values = np.array([known[i] for i in seen], dtype=float)
        if not seen:
            score = -self.transfer.copy()
        elif portfolio_step(len(tried), self.sources):
            score = -portfolio_regret(*self.sources, tried, seen, values)
        else:
            prior = np.nan_to_num(agreement_regret(*self.sources, seen, values), nan=1.0)
            mean, std, _ = calibrated_posterior(prior, seen, values, self.candidates)
            score = expected_improvement(mean, std, float(values.max())) if tried else mean.copy()
        score[~self.available] = -np.inf
        score[tried] = -np.inf
        return Trial(self.candidates[best_candidate(score, self.transfer)].copy())

    def tell(self, trial: Trial, result: Result) -> None:
        """Results are read from the history at the next ask."""
