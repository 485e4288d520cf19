"""Fine-tune and score: the one pipeline behind every evaluation and ``apply_policy``'s final model.

``finetune_and_score(ctx, mask)`` fine-tunes a fresh copy of the task's base model with the mask's
modules trainable, then measures everything: denoising losses (canary and train/held-out gaps),
samples (DDIM + CFG), nearest-neighbour copies against the training set (FAISS), extraction,
KID/FID and Wen's noise norm. ``evaluate_spec(spec)`` is the same as a pure function of a spec.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memrl.context import TaskContext
from memrl.encoders import embed
from memrl.errors import DataError, SpecError
from memrl.finetune import finetune
from memrl.metrics.membership import membership_auc, membership_metrics, tpr_at_fpr
from memrl.metrics.memorization import copy_scores, denoising_loss, extraction_count, noise_norm
from memrl.metrics.quality import domain_fidelity, fid_kid
from memrl.peft_methods import under
from memrl.sampling import sample
from memrl.spec import EvalSpec, Evaluation
from memrl.training import FinetuneResult
from memrl.utils import package_versions

__all__ = [
    "CurveRecorder",
    "base_samples",
    "domain_fidelities",
    "evaluate_spec",
    "finetune_and_score",
    "from_uint8",
    "loss_metrics",
    "sample_labels",
    "score_model",
]

if TYPE_CHECKING:
    from memrl.models import DiffusionModel

log = logging.getLogger("memrl.scoring")


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


def loss_metrics(model: DiffusionModel, ctx: TaskContext) -> dict[str, float]:
    """The loss-based metrics of ``model`` on ``ctx``'s task (no sampling): denoising losses of
    private and held-out images, the canaries' gap, membership inference (AUC and TPR at low FPR
    of the canaries, the whole private set and its non-canary images against held-out images) and
    the low tail (log ratio of the held-out to the training losses' 10% quantiles). What every
    checkpoint of a curve measures."""

    splits, m = ctx.splits, ctx.cfg.metrics
    trained = ctx.model_splits  # the images themselves, or their latents on the Stable Diffusion path
    is_canary = torch.zeros(len(splits.private), dtype=torch.bool)
    is_canary[splits.canary_index] = True
    train_loss = denoising_loss(model, trained.private.images, trained.private.labels, m.loss_timesteps)
    heldout_loss = denoising_loss(model, trained.heldout.images, trained.heldout.labels, m.loss_timesteps)
    held = float(heldout_loss.mean())
    non_canary = train_loss[~is_canary]
    canary = train_loss[is_canary]
    nan = float("nan")
    tail = nan
    if len(non_canary):
        low_held, low_train = float(heldout_loss.quantile(0.1)), float(non_canary.quantile(0.1))
        tail = math.log(low_held / low_train) if low_held > 0 and low_train > 0 else nan
    return {
        "heldout_loss": held,
        "train_loss": float(non_canary.mean()) if len(non_canary) else nan,
        "canary_loss": float(canary.mean()) if len(canary) else nan,
        "loss_gap": held - float(non_canary.mean()) if len(non_canary) else nan,
        "canary_loss_gap": held - float(canary.mean()) if len(canary) else nan,
        **membership_metrics(train_loss, heldout_loss, is_canary),
        "mia_auc_noncanary": membership_auc(non_canary, heldout_loss),
        "mia_tpr_noncanary": tpr_at_fpr(non_canary, heldout_loss),
        "loss_low_tail": tail,
    }


def score_model(model: DiffusionModel, ctx: TaskContext, mask: np.ndarray, ft: FinetuneResult) -> Evaluation:
    """Every metric of a fine-tuned ``model`` on ``ctx``'s task (``ft``: how it was fine-tuned)."""

    splits, m, s = ctx.splits, ctx.cfg.metrics, ctx.cfg.sample
    trained = ctx.model_splits
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    losses = loss_metrics(model, ctx)
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
    extracted, match_frac = extraction_count(samples, splits.private.images, ctx.extraction_threshold)
    quality = fid_kid(ctx.encoder, samples, splits.heldout.images, m.kid_subset_size)
    norms = {}
    canary_labels = trained.canaries.labels
    if canary_labels is not None and len(canary_labels) and trained.heldout.labels is not None:
        norms["noise_norm_canary"] = float(noise_norm(model, canary_labels, m.noise_norm_timesteps).mean())
        norms["noise_norm_heldout"] = float(
            noise_norm(model, trained.heldout.labels[:32], m.noise_norm_timesteps).mean()
        )
    timings["metrics"] = time.perf_counter() - t0

    metrics = {
        **losses,
        **{k: float(v) for k, v in dataclasses.asdict(scores).items()},
        "copy_threshold": ctx.threshold,
        "extracted": float(extracted),
        "extraction_threshold": ctx.extraction_threshold,
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


def domain_fidelities(
    ctx: TaskContext, evaluations: list[Evaluation], base: Evaluation | None = None
) -> list[dict[str, float]]:
    """Each evaluation's samples placed between the base model's samples (0; ``base``'s, the base
    model's own evaluation, or drawn here as :func:`score_model` draws them) and the held-out images
    (1): :func:`memrl.metrics.quality.domain_fidelity`'s figures (``fidelity``, the vote's
    ``floor``, ``ceiling`` and ``range``). NaN (with a warning) where there are too few held-out
    images for the vote."""
    base_images = base_samples(ctx) if base is None else from_uint8(base)
    held, out = ctx.splits.heldout.images, []
    for evaluation in evaluations:
        try:
            out.append(domain_fidelity(ctx.encoder, from_uint8(evaluation), held, base_images))
        except DataError as e:
            log.warning("no domain fidelity: %s", e)
            out.append(dict.fromkeys(("fidelity", "share", "floor", "ceiling", "range"), math.nan))
    return out


def base_samples(ctx: TaskContext, seed: int | None = None) -> torch.Tensor:
    """The base model's samples in [-1, 1], drawn as :func:`score_model` draws them (seed: the
    fine-tune seed unless given)."""
    s = ctx.cfg.sample
    labels, _ = sample_labels(ctx)
    seed = ctx.cfg.finetune.seed if seed is None else seed
    return ctx.to_images(sample(ctx.base, labels, steps=s.steps, guidance=s.guidance, seed=seed))


def from_uint8(evaluation: Evaluation) -> torch.Tensor:
    """An evaluation's kept samples back in [-1, 1]."""
    if evaluation.samples is None:
        raise SpecError("domain fidelity needs evaluations that kept their samples (score_model's)")
    return torch.from_numpy(evaluation.samples).float() / 127.5 - 1


class CurveRecorder:
    """Measures one fine-tune at its checkpoints (``finetune.checkpoint_every``), as its
    ``on_step``: :func:`loss_metrics` at every checkpoint, every metric (:func:`score_model`) at
    ``finetune.sample_at``, and at both each group's share of the squared gradient norm summed over
    the steps since the last checkpoint (``grad_share``, in the search space's group order).
    Measuring does not change the run (``memrl.training.train_denoiser``)."""

    def __init__(self, ctx: TaskContext, mask: np.ndarray) -> None:
        f = ctx.cfg.finetune
        self.ctx, self.mask = ctx, mask
        self.every, self.steps, self.sample_at = int(f.checkpoint_every or 0), f.steps, set(f.sample_at or ())
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._params: list[list[torch.nn.Parameter]] | None = None
        self._sums = torch.zeros(ctx.space.k, dtype=torch.float64)

    def _group_params(self, model: DiffusionModel) -> list[list[torch.nn.Parameter]]:
        held = model.switchable or set()  # a run whose groups change: every group it may train
        named = [(n, p) for n, p in model.unet.named_parameters() if p.requires_grad or n in held]
        return [[p for n, p in named if under(n, prefixes)] for prefixes in self.ctx.space.groups.values()]

    def grad_share(self) -> list[float]:
        """Each group's share of the gradient norm since the last call (then reset)."""
        total = float(self._sums.sum())
        shares = (self._sums / total).tolist() if total > 0 else [0.0] * len(self._sums)
        self._sums.zero_()
        return [round(v, 6) for v in shares]

    def add_gradients(self, model: DiffusionModel) -> None:
        """Add this update's squared gradient norm per group (read by :meth:`grad_share`)."""
        if self._params is None:
            self._params = self._group_params(model)
        with torch.no_grad():
            for i, params in enumerate(self._params):
                self._sums[i] += sum(float(p.grad.square().sum()) for p in params if p.grad is not None)

    def __call__(self, model: DiffusionModel, n: int) -> None:
        start = time.perf_counter()
        self.add_gradients(model)
        if n % self.every == 0 and n < self.steps:
            if n in self.sample_at:
                metrics = score_model(model, self.ctx, self.mask, FinetuneResult()).metrics
            else:
                metrics = loss_metrics(model, self.ctx)
            self.points.append({"step": n, **metrics, "grad_share": self.grad_share()})
        self.seconds += time.perf_counter() - start

    def curve(self, final: Evaluation) -> list[dict[str, Any]]:
        """The checkpoints, then the final step (``final``'s metrics)."""
        return [*self.points, {"step": self.steps, **final.metrics, "grad_share": self.grad_share()}]


def finetune_and_score(ctx: TaskContext, mask: np.ndarray) -> tuple[DiffusionModel, Evaluation]:
    """Fine-tune a fresh copy of the task's base model with ``mask`` and score it; with
    ``finetune.checkpoint_every`` set, also record its curve (:class:`CurveRecorder`).

    Raises FloatingPointError when the fine-tune diverges. Returns the model and its Evaluation.
    """

    mask = ctx.space.validate(mask)
    start = time.perf_counter()
    base, data = ctx.base, ctx.model_splits.finetune_set()
    context_time = time.perf_counter() - start
    recorder = CurveRecorder(ctx, mask) if ctx.cfg.finetune.checkpoint_every else None
    model, ft = finetune(base, data, ctx.space.prefixes(mask), ctx.cfg, recorder)
    if ft.diverged:
        raise FloatingPointError(f"fine-tune diverged: {ft.stop_reason}; lower finetune.lr")
    result = score_model(model, ctx, mask, ft)
    if recorder is not None:
        result.curve = recorder.curve(result)
        result.timings["checkpoints"] = recorder.seconds
        result.timings["finetune"] = ft.wall_time - recorder.seconds
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
