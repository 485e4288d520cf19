"""A fixed-length description of a private dataset: what a policy sees of the data.

Version 2: every feature means the same on every task and needs no fine-tune. Nothing comes from
an encoder trained on the task itself (version 1's embedding features did, so they were not
comparable between tasks). Four families (:data:`FAMILIES`):

* ``protocol``: what the user knows: number of images, duplication, canary share, labels;
* ``pixels``: statistics of the private images that need no encoder: intensity moments, the
  slope of the radially averaged power spectrum, edge density, and nearest-neighbour pixel
  distances (private to private, private to the base domain, held-out to private);
* ``base_loss``: the base model's denoising loss on the private set per timestep band;
* ``gradient``: per module group of the search space, the root-mean-square of the base model's
  loss gradient per parameter on the private set and on the canaries (the signal gradient-based
  parameter selection uses: GPS, Zhang et al. CVPR 2024; SPT, He et al. ICCV 2023), as
  ``(log10(rms) + 5) / 5``.

Its length depends only on the search space (``k`` groups): a policy trained on some datasets
applies to any other on the same base model. Entries are scaled to roughly [0, 1].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from memrl.metrics.memorization import denoising_loss
from memrl.training import noise_scheduler
from memrl.utils import stable_hash

__all__ = [
    "DESCRIPTOR_VERSION",
    "FAMILIES",
    "LOSS_BANDS",
    "describe",
    "descriptor_fields",
    "descriptor_key",
    "edge_density",
    "family_slices",
    "gradient_sensitivity",
    "pixel_features",
    "spectral_slope",
]

if TYPE_CHECKING:
    from memrl.context import TaskContext

DESCRIPTOR_VERSION = 2
LOSS_BANDS = (50, 250, 500, 750)
"""Timesteps of the base model's loss features (low to high noise)."""
FAMILIES: dict[str, tuple[str, ...]] = {
    "protocol": ("log_size", "log_duplication", "canary_share", "label_coverage"),
    "pixels": (
        "pixel_mean",  # (mean in [-1, 1] + 1) / 2
        "pixel_std",
        "pixel_skew",  # / 4
        "pixel_kurtosis",  # log1p(excess kurtosis + 3) / 3
        "spectral_slope",  # -slope / 4 of log power against log frequency
        "edge_density",  # share of pixels with gradient magnitude above 0.25
        "self_distance",  # mean RMS pixel distance to the nearest other private image
        "base_distance",  # ... of private images to the nearest base-domain image
        "heldout_distance",  # ... of held-out images to the nearest private image
    ),
    "base_loss": tuple(f"base_loss_t{t}" for t in LOSS_BANDS),
}
"""The feature families of fixed size; ``gradient`` (two per group) follows them."""


def descriptor_key(fingerprints: dict[str, str]) -> str:
    """Where a task's descriptor is stored: its fingerprints (data, base model, search space) and
    :data:`DESCRIPTOR_VERSION`."""

    return stable_hash([fingerprints, DESCRIPTOR_VERSION])


def descriptor_fields(k: int) -> tuple[str, ...]:
    """The names of the descriptor's entries for a search space of ``k`` groups."""
    fixed = tuple(name for names in FAMILIES.values() for name in names)
    gradient = tuple(f"grad_private_{g}" for g in range(k)) + tuple(f"grad_canary_{g}" for g in range(k))
    return fixed + gradient


def family_slices(k: int) -> dict[str, slice]:
    """Where each family sits in the descriptor (for ablations that zero one)."""
    out, start = {}, 0
    for family, names in FAMILIES.items():
        out[family] = slice(start, start + len(names))
        start += len(names)
    out["gradient"] = slice(start, start + 2 * k)
    return out


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.float().flatten(1)


def _nn_distance(queries: torch.Tensor, keys: torch.Tensor, exclude_self: bool = False) -> float:
    """Mean over queries of the RMS pixel distance to the nearest key."""
    d = torch.cdist(_flat(queries), _flat(keys)) / math.sqrt(_flat(queries).shape[1])
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.mean())


def spectral_slope(images: torch.Tensor) -> float:
    """Slope of log mean power against log radial frequency (natural images: about -2)."""
    x = images.float().mean(1)  # (N, H, W)
    power = torch.fft.fftshift(
        torch.fft.fft2(x - x.mean(dim=(1, 2), keepdim=True)).abs().square(), dim=(1, 2)
    )
    power = power.mean(0)
    h, w = power.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.float() ** 2 + xx.float() ** 2).round().long()
    radii = torch.arange(1, min(h, w) // 2)
    profile = torch.stack([power[radius == r].mean() for r in radii])
    slope = np.polyfit(np.log(radii.numpy()), np.log(profile.clamp_min(1e-12).numpy()), 1)[0]
    return float(slope)


def edge_density(images: torch.Tensor, threshold: float = 0.25) -> float:
    """Share of pixels whose finite-difference gradient magnitude exceeds ``threshold``."""
    x = images.float().mean(1)
    gx, gy = x[:, :, 1:] - x[:, :, :-1], x[:, 1:, :] - x[:, :-1, :]
    magnitude = torch.sqrt(gx[:, :-1, :].square() + gy[:, :, :-1].square())
    return float((magnitude > threshold).float().mean())


def pixel_features(private: torch.Tensor, heldout: torch.Tensor, base: torch.Tensor) -> list[float]:
    """The ``pixels`` family (images in [-1, 1])."""
    v = private.float().flatten()
    mean, std = float(v.mean()), float(v.std())
    z = (v - mean) / max(std, 1e-6)
    skew, kurtosis = float(z.pow(3).mean()), float(z.pow(4).mean()) - 3.0
    return [
        (mean + 1) / 2,
        std,
        skew / 4,
        math.log1p(max(kurtosis + 3.0, 0.0)) / 3,
        -spectral_slope(private) / 4,
        edge_density(private),
        _nn_distance(private, private, exclude_self=True),
        _nn_distance(private, base),
        _nn_distance(heldout, private),
    ]


def _loss(model, images: torch.Tensor, labels: torch.Tensor | None, timesteps: list[int]) -> torch.Tensor:
    """Mean epsilon-prediction MSE at ``timesteps`` with seeded noise (with a graph)."""

    sched = noise_scheduler(model)
    g = torch.Generator().manual_seed(0)
    labels = model.labels_or_null(labels, len(images))
    total = images.new_zeros(())
    for t in timesteps:
        noise = torch.randn(images.shape, generator=g)
        tt = torch.full((len(images),), t, dtype=torch.long)
        total = total + F.mse_loss(model(sched.add_noise(images, noise, tt), tt, labels), noise)
    return total / len(timesteps)


def gradient_sensitivity(ctx: TaskContext, images: torch.Tensor, labels: torch.Tensor | None) -> list[float]:
    """Per group: RMS per parameter of the base model's loss gradient on ``images``, scaled
    ``(log10(rms) + 5) / 5``. The base model is not changed (gradients are cleared)."""
    model = ctx.base
    model.eval()
    params = dict(model.unet.named_parameters())
    wanted = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        _loss(model, images, labels, list(LOSS_BANDS)).backward()
        out = []
        for prefixes in ctx.space.groups.values():
            grads = [
                p.grad.flatten()
                for name, p in params.items()
                if p.grad is not None and any(name.startswith(prefix + ".") for prefix in prefixes)
            ]
            flat = torch.cat(grads) if grads else torch.zeros(1)
            rms = float(flat.square().mean().sqrt())
            out.append((math.log10(max(rms, 1e-12)) + 5) / 5)
        return out
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(wanted[name])


def describe(ctx: TaskContext) -> np.ndarray:
    """The descriptor of ``ctx``'s private set (computed with its base model; no fine-tune)."""

    splits = ctx.splits
    private = splits.private
    trained = ctx.model_splits  # what the model sees: images, or latents on the Stable Diffusion path
    finetune_size = len(private) + len(splits.canary_index) * max(splits.duplication - 1, 0)
    labels = private.labels
    coverage = 0.0 if labels is None else len(labels.unique()) / ctx.base.num_classes
    protocol = [
        math.log(len(private)) / math.log(1000),
        math.log(max(splits.duplication, 1)) / math.log(300),
        len(splits.canary_index) * splits.duplication / finetune_size if finetune_size else 0.0,
        coverage,
    ]
    pixels = pixel_features(private.images, splits.heldout.images, splits.base.images[:512])
    base_loss = [
        float(denoising_loss(ctx.base, trained.private.images, trained.private.labels, [t]).mean())
        for t in LOSS_BANDS
    ]
    canaries = trained.private.subset(splits.canary_index) if len(splits.canary_index) else trained.private
    gradient = gradient_sensitivity(ctx, trained.private.images, trained.private.labels)
    gradient += gradient_sensitivity(ctx, canaries.images, canaries.labels)
    values = np.asarray(protocol + pixels + base_loss + gradient, dtype=np.float32)
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
