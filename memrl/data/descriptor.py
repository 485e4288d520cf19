"""A fixed-length description of a private dataset: the policy's observation.

Its length never depends on the dataset, so a policy trained on some datasets applies to any
other on the same base model. Every entry is scaled to roughly [0, 1].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from memrl.task import TaskContext

DESCRIPTOR_VERSION = 1
DESCRIPTOR_FIELDS = (
    "log_size",  # log(#private images) / log(1000)
    "resolution",  # side / 64
    "log_duplication",  # log(canary duplication) / log(300)
    "canary_share",  # share of the fine-tune set that is canary copies
    "label_coverage",  # distinct labels / base model's classes (0 when unlabelled)
    "pixel_std",  # std of private pixels (in [-1, 1] units) / 2 * 2
    "self_similarity",  # mean cosine to nearest other private image (encoder space)
    "base_similarity",  # mean cosine of private images to nearest base-split image
    "heldout_similarity",  # mean cosine of held-out images to nearest private image
    "intrinsic_dim",  # participation ratio of the embedding spectrum / embedding dim
    "base_loss",  # base model's denoising loss on the private set
    "loss_ratio",  # that loss / base model's loss on its own base split (capped at 3) / 3
)


def _nn_similarity(queries: torch.Tensor, keys: torch.Tensor, exclude_self: bool = False) -> float:
    sims = queries @ keys.T
    if exclude_self:
        sims.fill_diagonal_(-1.0)
    return float(sims.max(dim=1).values.mean())


def participation_ratio(embeddings: torch.Tensor) -> float:
    """(sum λ)² / sum λ² of the covariance spectrum: an intrinsic-dimension estimate."""
    x = embeddings - embeddings.mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x / max(len(x) - 1, 1)).clamp_min(0)
    return float(eig.sum() ** 2 / eig.square().sum().clamp_min(1e-12))


def describe(ctx: TaskContext) -> np.ndarray:
    """The descriptor of ``ctx``'s private set (computed with its base model and encoder)."""
    from memrl.encoders import embed
    from memrl.metrics.memorization import denoising_loss

    splits, m = ctx.splits, ctx.cfg.metrics
    private, base = splits.private, splits.base
    trained = ctx.model_splits  # what the model sees: images, or latents on the Stable Diffusion path
    priv_emb = ctx.train_embeddings
    base_emb = embed(ctx.encoder, base.images[:512])
    finetune_size = len(private) + len(splits.canary_index) * max(splits.duplication - 1, 0)
    labels = private.labels
    coverage = 0.0 if labels is None else len(labels.unique()) / ctx.base.num_classes
    base_loss = float(
        denoising_loss(ctx.base, trained.private.images, trained.private.labels, m.loss_timesteps).mean()
    )
    own_loss = float(
        denoising_loss(
            ctx.base,
            trained.base.images[:256],
            trained.base.labels[:256] if trained.base.labels is not None else None,
            m.loss_timesteps,
        ).mean()
    )
    values = [
        math.log(len(private)) / math.log(1000),
        private.resolution / 64,
        math.log(max(splits.duplication, 1)) / math.log(300),
        len(splits.canary_index) * splits.duplication / finetune_size if finetune_size else 0.0,
        coverage,
        float(private.images.std()),
        _nn_similarity(priv_emb, priv_emb, exclude_self=True),
        _nn_similarity(priv_emb, base_emb),
        _nn_similarity(ctx.heldout_embeddings, priv_emb),
        participation_ratio(priv_emb) / priv_emb.shape[1],
        base_loss,
        min(base_loss / max(own_loss, 1e-8), 3.0) / 3,
    ]
    return np.asarray(values, dtype=np.float32)
