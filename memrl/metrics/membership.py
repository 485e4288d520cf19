"""Loss-based membership inference: does the model's denoising loss tell training images from
held-out ones?

The attack of Carlini et al. (2023, "Extracting training data from diffusion models") and
Matsumoto et al. (2023) in its simplest, threshold form: an image whose denoising loss (at fixed
noise and timesteps, :func:`memrl.metrics.memorization.denoising_loss`) is low is called a member.
Reported as the ROC AUC and the true-positive rate at a stated low false-positive rate, for the
canaries against held-out images and for the whole private set against held-out images.

The raw loss also reflects how hard an image is for any model: images that happen to be easy look
like members even to a model that never saw them. :func:`calibrated_losses` divides each image's
loss by a reference model's on the same image and noise (difficulty calibration, Watson et al.,
ICLR 2022; on log losses, so by ratio), which removes that; the audit reports both.

With ``n`` held-out images the smallest false-positive rate that can be resolved is ``1 / n``;
below it the threshold is the lowest held-out loss (no held-out image is called a member).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "MIA_FPR",
    "bootstrap_interval",
    "calibrated_losses",
    "membership_auc",
    "membership_metrics",
    "tpr_at_fpr",
]

MIA_FPR = 0.01
"""The false-positive rate at which the true-positive rate is reported (Carlini et al.'s 1%)."""


def _scores(losses: torch.Tensor | np.ndarray) -> np.ndarray:
    """Membership scores: higher means "more likely a member" (minus the loss)."""
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    return -values


def membership_auc(
    member_losses: torch.Tensor | np.ndarray, nonmember_losses: torch.Tensor | np.ndarray
) -> float:
    """ROC AUC of the loss-threshold attack: the chance that a random member has a lower loss than
    a random non-member (ties count half; the Mann-Whitney U statistic). 0.5 is chance; NaN when
    either set is empty."""
    members, others = _scores(member_losses), _scores(nonmember_losses)
    if len(members) == 0 or len(others) == 0:
        return math.nan
    greater = (members[:, None] > others[None, :]).sum()
    ties = (members[:, None] == others[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(members) * len(others)))


def tpr_at_fpr(
    member_losses: torch.Tensor | np.ndarray,
    nonmember_losses: torch.Tensor | np.ndarray,
    fpr: float = MIA_FPR,
) -> float:
    """True-positive rate of the loss-threshold attack at a false-positive rate of at most ``fpr``.

    The threshold lets through ``floor(fpr * n)`` of the ``n`` non-members (those with the lowest
    losses); members are called members when their score is strictly above it. NaN when either set
    is empty.
    """
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr={fpr} must be in [0, 1)")
    members, others = _scores(member_losses), _scores(nonmember_losses)
    if len(members) == 0 or len(others) == 0:
        return math.nan
    allowed = math.floor(fpr * len(others))
    threshold = np.sort(others)[::-1][allowed]
    return float((members > threshold).mean())


def calibrated_losses(
    losses: torch.Tensor | np.ndarray, reference_losses: torch.Tensor | np.ndarray
) -> np.ndarray:
    """``log(loss / reference loss)`` per image (the same images, noise and timesteps for both
    models): lower is more member-like, so it feeds :func:`membership_auc` and :func:`tpr_at_fpr` as
    a loss does. A model scored against itself gives 0 everywhere (AUC 0.5)."""
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference_losses, dtype=np.float64).reshape(-1)
    if values.shape != reference.shape:
        raise ValueError(f"{values.shape[0]} losses against {reference.shape[0]} reference losses")
    tiny = np.finfo(np.float64).tiny
    return np.log(np.maximum(values, tiny) / np.maximum(reference, tiny))


def membership_metrics(
    private_losses: torch.Tensor,
    heldout_losses: torch.Tensor,
    is_canary: torch.Tensor,
    fpr: float = MIA_FPR,
) -> dict[str, float]:
    """AUC and TPR at ``fpr`` for canaries and for the whole private set against held-out images.

    Keys: ``mia_auc_canary``, ``mia_tpr_canary``, ``mia_auc_private``, ``mia_tpr_private``.
    """
    canary = private_losses[is_canary]
    return {
        "mia_auc_canary": membership_auc(canary, heldout_losses),
        "mia_tpr_canary": tpr_at_fpr(canary, heldout_losses, fpr),
        "mia_auc_private": membership_auc(private_losses, heldout_losses),
        "mia_tpr_private": tpr_at_fpr(private_losses, heldout_losses, fpr),
    }


def bootstrap_interval(
    member_losses: torch.Tensor | np.ndarray,
    nonmember_losses: torch.Tensor | np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(members, non-members)`` over images: both sets
    resampled with replacement, independently, ``n_boot`` times. NaN when either set is empty."""
    members = np.asarray(member_losses, dtype=np.float64).reshape(-1)
    others = np.asarray(nonmember_losses, dtype=np.float64).reshape(-1)
    if len(members) == 0 or len(others) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            statistic(
                members[rng.integers(0, len(members), len(members))],
                others[rng.integers(0, len(others), len(others))],
            )
            for _ in range(n_boot)
        ]
    )
    tail = (1 - level) / 2
    return float(np.nanquantile(values, tail)), float(np.nanquantile(values, 1 - tail))
