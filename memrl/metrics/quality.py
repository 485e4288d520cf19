"""Quality metrics: FID and KID through torchmetrics on memrl's encoder (no download)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from memrl.encoders import embed
from memrl.errors import DataError

__all__ = ["FAINT_VOTE", "domain_fidelity", "fid_kid", "quality_controls"]

FAINT_VOTE = 0.4
"""Below this vote range (``ceiling - floor`` of :func:`domain_fidelity`) the base model's samples
are hard to tell from the held-out images, and domain fidelity is faint: on suite v3's five
sources with a range of 0.18-0.38 (photos, fashion, coins, camera, non-faces) further draws of
the base model scored -0.23 to +0.17, against -0.10 to +0.07 on the nine with 0.52 or more
(``python bench/world.py vote``; docs/world.md)."""


class _Features(nn.Module):
    """Adapter giving torchmetrics a feature extractor with ``num_features``."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@torch.no_grad()
def fid_kid(
    encoder: nn.Module,
    generated: torch.Tensor,
    real: torch.Tensor,
    kid_subset_size: int = 32,
    kid_subsets: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean, std) of ``generated`` against ``real`` images in [-1, 1].

    KID is unbiased and usable at small sample counts; FID's covariance is rank-deficient when
    there are fewer samples than feature dimensions, so prefer KID as a reward term there.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = _Features(encoder)
    subset = min(kid_subset_size, len(generated), len(real))
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, subset_size=subset, subsets=kid_subsets)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(generated, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID's random subsets: the same every time for the same inputs
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


@torch.no_grad()
def quality_controls(
    encoder: nn.Module, reference: torch.Tensor, real: torch.Tensor, kid_subset_size: int = 32, seed: int = 0
) -> dict[str, float]:
    """KID against ``reference`` images of three controls a quality metric must order: other
    ``real`` images of the same source (the floor), Gaussian noise clipped to [-1, 1], and one
    constant grey image repeated. A metric that does not rate the last two far worse than the
    first cannot tell samples that look like the data from samples that do not."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(real.shape, generator=g).clamp(-1, 1)
    constant = torch.zeros_like(real)
    return {
        name: fid_kid(encoder, images, reference, kid_subset_size, seed=seed)["kid"]
        for name, images in (("real", real), ("noise", noise), ("constant", constant))
    }


@torch.no_grad()
def domain_fidelity(
    encoder: nn.Module, generated: torch.Tensor, real: torch.Tensor, base: torch.Tensor, k: int = 5
) -> dict[str, float]:
    """How far ``generated`` samples moved from the base model's samples (``base``) toward the
    ``real`` held-out images, by a k-nearest-neighbour vote in ``encoder``'s features (cosine):
    the share of each sample's ``k`` neighbours among real and base images that are real.

    ``fidelity`` rescales that share between the base samples' own (leave-one-out, the floor: 0
    = draws like the base model) and the real images' own (the ceiling: 1 = draws like the data).
    KID and held-out loss do not see this: a model that still draws its pretraining mix can score
    as well on them as one that draws the new domain (docs/world.md, the text task). Real and base
    are cut to the same count so the vote is not tilted by their sizes; ``k`` is cut below it.
    ``range`` (ceiling - floor) says how well the vote tells the two apart: below
    :data:`FAINT_VOTE` the figure is faint (the base model already draws close to the data)."""
    n = min(len(real), len(base))
    if n < 4:
        raise DataError(
            f"domain fidelity needs at least 4 held-out images and base samples (got {len(real)} and "
            f"{len(base)}); give more held-out images or samples"
        )
    k = min(k, n - 1)  # a leave-one-out vote needs k below the smaller group

    def features(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(embed(encoder, x), dim=1)

    pool = torch.cat([features(real[:n]), features(base[:n])])
    is_real = torch.cat([torch.ones(n), torch.zeros(n)])

    def share(queries: torch.Tensor, own: slice | None = None) -> float:
        sims = queries @ pool.T
        if own is not None:  # leave each pooled image out of its own vote
            sims[torch.arange(len(queries)), torch.arange(own.start, own.stop)] = -math.inf
        return float(is_real[sims.topk(k, dim=1).indices].mean())

    floor = share(pool[n:], slice(n, 2 * n))
    ceiling = share(pool[:n], slice(0, n))
    raw = share(features(generated))
    return {
        "fidelity": (raw - floor) / max(ceiling - floor, 1e-6),
        "share": raw,
        "floor": floor,
        "ceiling": ceiling,
        "range": ceiling - floor,
    }
