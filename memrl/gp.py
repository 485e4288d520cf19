"""Gaussian-process math over masks, numpy only: the posterior of every mask's reward given the
masks tried, the calibrated posterior whose prior mean is what transfers, and expected
improvement. Used by the search policy's observation (:mod:`memrl.episode`) and by the
``gp-prior`` searcher (:mod:`memrl.searchers.transfer`)."""

from __future__ import annotations

from math import erf

import numpy as np

__all__ = [
    "LENGTHSCALE",
    "NOISE",
    "best_candidate",
    "calibrated_posterior",
    "expected_improvement",
    "posterior",
]

LENGTHSCALE = 0.25
"""The posterior's kernel: exp(-Hamming distance / (LENGTHSCALE * K))."""
NOISE = 0.05
"""The posterior's noise variance, in units of the observed rewards' spread."""


def posterior(
    observed: np.ndarray, values: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-process mean and standard deviation of every candidate given the observed masks'
    values (already standardised; Hamming-distance exponential kernel, :data:`NOISE`)."""
    k = candidates.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        hamming = np.abs(a[:, None, :].astype(float) - b[None, :, :]).sum(axis=2)
        return np.exp(-hamming / (LENGTHSCALE * k))

    gram = kernel(observed, observed) + NOISE * np.eye(len(observed))
    cross = kernel(candidates, observed)
    chol = np.linalg.cholesky(gram)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, values))
    v = np.linalg.solve(chol, cross.T)
    variance = np.clip(1.0 - (v**2).sum(axis=0), 1e-9, None)
    return cross @ alpha, np.sqrt(variance)


def calibrated_posterior(
    prior_regret: np.ndarray, observed: list[int], values: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Posterior of every candidate's reward with what transfers as its prior mean: an affine map
    from the prior's regret (:meth:`memrl.prior.TransferPrior.transfer_regret`) to reward, fitted on the
    ``observed`` candidates' ``values`` (slope never negative: low prior regret never predicts a
    low reward), and :func:`posterior` on the residuals. Returns the mean and standard deviation in
    reward units, and the observed rewards' spread (the unit the residuals were scaled by)."""
    x = prior_regret[observed]
    design = np.column_stack([np.ones(len(observed)), -x])
    (_, slope), *_ = np.linalg.lstsq(design, values, rcond=None)
    slope = max(float(slope), 0.0)
    intercept = float(np.mean(values + slope * x))
    mean = intercept - slope * prior_regret
    scale = max(float(np.std(values)), 0.05)
    mu, std = posterior(candidates[observed], (values - mean[observed]) / scale, candidates)
    return mean + scale * mu, scale * std, scale


def best_candidate(score: np.ndarray, prior_regret: np.ndarray) -> int:
    """The index of the largest ``score``, ties (to 1e-9) going to the lowest ``prior_regret`` (when results
    say nothing, e.g. two references of equal reward make every mean equal, the prior decides,
    not the counting order, whose first mask is no fine-tune)."""
    top = np.flatnonzero(np.isclose(score, np.max(score), rtol=1e-9, atol=1e-12))
    return int(top[np.argmin(prior_regret[top])])  # the first of equal minima


def expected_improvement(mean: np.ndarray, std: np.ndarray, incumbent: float) -> np.ndarray:
    """Expected improvement over ``incumbent`` of Gaussian beliefs (same units as ``mean``)."""
    z = (mean - incumbent) / std
    return std * (z * _normal_cdf(z) + np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(erf)(z / np.sqrt(2.0)))
