"""Fine-tune and score: the one pipeline behind every evaluation and ``apply_policy``'s final model.

``finetune_and_score(ctx, mask)`` fine-tunes a fresh copy of the task's base model with the mask's
modules trainable, then measures everything: denoising losses (canary and train/held-out gaps),
samples (DDIM + CFG), nearest-neighbour copies against the training set (FAISS), extraction,
KID/FID and Wen's noise norm. ``evaluate_spec(spec)`` is the same as a pure function of a spec.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from memrl.context import TaskContext
from memrl.errors import SpecError
from memrl.spec import EvalSpec, Evaluation
from memrl.utils import package_versions

if TYPE_CHECKING:
    from memrl.models import DiffusionModel
    from memrl.training import FinetuneResult


def sample_labels(ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels to sample with: a share from the canaries' labels, the rest from held-out labels.

    Returns (labels, is_canary_conditioned); -1 means unconditional (unlabelled data).
    """
    n = ctx.cfg.sample.num_samples
    splits = ctx.model_splits
    n_canary = round(n * ctx.cfg.sample.canary_fraction) if len(splits.canary_index) else 0
    canary = splits.canaries.labels
    heldout = splits.heldout.labels
    null = torch.full((n,), -1, dtype=torch.long)
    parts = []
    if n_canary:
        parts.append(
            canary.repeat(n_canary // len(canary) + 1)[:n_canary] if canary is not None else null[:n_canary]
        )
    if n - n_canary:
        parts.append(
            heldout.repeat((n - n_canary) // len(heldout) + 1)[: n - n_canary]
            if heldout is not None
            else null[: n - n_canary]
        )
    is_canary = torch.arange(n) < n_canary
    return torch.cat(parts), is_canary


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def score_model(model: DiffusionModel, ctx: TaskContext, mask: np.ndarray, ft: FinetuneResult) -> Evaluation:
    """Every metric of a fine-tuned ``model`` on ``ctx``'s task (``ft``: how it was fine-tuned)."""
    from memrl.encoders import embed
    from memrl.metrics.membership import membership_metrics
    from memrl.metrics.memorization import copy_scores, denoising_loss, extraction_count, noise_norm
    from memrl.metrics.quality import fid_kid
    from memrl.sampling import sample

    splits, m, s = ctx.splits, ctx.cfg.metrics, ctx.cfg.sample
    trained = ctx.model_splits  # the images themselves, or their latents on the Stable Diffusion path
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    is_canary_private = torch.zeros(len(splits.private), dtype=torch.bool)
    is_canary_private[splits.canary_index] = True
    train_loss = denoising_loss(model, trained.private.images, trained.private.labels, m.loss_timesteps)
    heldout_loss = denoising_loss(model, trained.heldout.images, trained.heldout.labels, m.loss_timesteps)
    timings["losses"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels, is_canary = sample_labels(ctx)
    samples = sample(model, labels, steps=s.steps, guidance=s.guidance, seed=ctx.cfg.finetune.seed)
    samples = ctx.to_images(samples)
    timings["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample_emb = embed(ctx.encoder, samples)
    scores = copy_scores(sample_emb, ctx.index, ctx.threshold, splits.canary_index, is_canary, m.ratio_test)
    _, nearest = ctx.index.search(sample_emb, 1)
    extracted, match_frac = extraction_count(samples, splits.private.images, m.extraction_threshold)
    quality = fid_kid(ctx.encoder, samples, splits.heldout.images, m.kid_subset_size)
    norms = {}
    canary_labels = trained.canaries.labels
    if canary_labels is not None and len(canary_labels) and trained.heldout.labels is not None:
        norms["noise_norm_canary"] = float(noise_norm(model, canary_labels, m.noise_norm_timesteps).mean())
        norms["noise_norm_heldout"] = float(
            noise_norm(model, trained.heldout.labels[:32], m.noise_norm_timesteps).mean()
        )
    timings["metrics"] = time.perf_counter() - t0

    held = float(heldout_loss.mean())
    non_canary = train_loss[~is_canary_private]
    canary = train_loss[is_canary_private]
    nan = float("nan")
    metrics = {
        "heldout_loss": held,
        "train_loss": float(non_canary.mean()) if len(non_canary) else nan,
        "canary_loss": float(canary.mean()) if len(canary) else nan,
        "loss_gap": held - float(non_canary.mean()) if len(non_canary) else nan,
        "canary_loss_gap": held - float(canary.mean()) if len(canary) else nan,
        **membership_metrics(train_loss, heldout_loss, is_canary_private),
        **{k: float(v) for k, v in dataclasses.asdict(scores).items()},
        "copy_threshold": ctx.threshold,
        "extracted": float(extracted),
        "extraction_match_fraction": match_frac,
        **quality,
        **norms,
        "finetune_loss": ft.final_loss,
        "trainable_params": float(ft.trainable_params),
        "trainable_fraction": ft.trainable_fraction,
        "group_fraction": ctx.space.group_fraction(mask),
    }
    return Evaluation(
        spec_hash=ctx.spec(mask).hash,
        mask=tuple(int(v) for v in mask),
        metrics=metrics,
        timings={**timings, "finetune": ft.wall_time},
        versions=package_versions(),
        samples=_to_uint8(samples),
        nearest=nearest[:, 0].numpy(),
    )


def finetune_and_score(ctx: TaskContext, mask: np.ndarray) -> tuple[DiffusionModel, Evaluation]:
    """Fine-tune a fresh copy of the task's base model with ``mask`` and score it.

    Raises FloatingPointError when the fine-tune diverges. Returns the model and its Evaluation.
    """
    from memrl.finetune import finetune

    mask = ctx.space.validate(mask)
    start = time.perf_counter()
    base, data = ctx.base, ctx.model_splits.finetune_set()
    context_time = time.perf_counter() - start
    model, ft = finetune(base, data, ctx.space.prefixes(mask), ctx.cfg)
    if ft.diverged:
        raise FloatingPointError(f"fine-tune diverged: {ft.stop_reason}; lower finetune.lr")
    result = score_model(model, ctx, mask, ft)
    result.timings.update(context=context_time, total=time.perf_counter() - start)
    return model, result


def evaluate_spec(spec: EvalSpec) -> Evaluation:
    """Fine-tune, sample and score one mask: a pure function of ``spec``; raises on failure.

    Raises :class:`~memrl.errors.SpecError` when the task built from the spec's settings has other
    fingerprints than the spec names (other data, base model or search space on this machine).
    """
    start = time.perf_counter()
    ctx = TaskContext.get(spec.to_config())
    if ctx.fingerprints != spec.fingerprints:
        differ = sorted(
            k
            for k in {*ctx.fingerprints, *spec.fingerprints}
            if ctx.fingerprints.get(k) != spec.fingerprints.get(k)
        )
        raise SpecError(
            f"spec {spec.hash} names {', '.join(differ)} fingerprints "
            f"{[spec.fingerprints.get(k) for k in differ]}, but its settings give "
            f"{[ctx.fingerprints.get(k) for k in differ]} here: the data, base model or search space "
            "changed since the spec was made; rebuild the spec from the current config"
        )
    _, result = finetune_and_score(ctx, np.asarray(spec.mask))
    result.timings["total"] = time.perf_counter() - start
    return result
