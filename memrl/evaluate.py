"""EvalSpec -> Evaluation: one short masked fine-tune, sampled and scored.

``evaluate_spec(spec)`` is a pure function of the spec (dataset settings, base model, search space,
method, mask, fine-tune / sampling / metric settings, seed); :class:`Evaluator` caches its results
in an :class:`~memrl.store.EvaluationStore` and runs misses on a backend:

* ``inprocess``: in this process (fast; a crash takes the caller down).
* ``subprocess``: a fresh worker process per evaluation (memory is returned; a segfault or OOM
  becomes a recorded failure).
* ``replay``: the store only; an unknown spec raises :class:`NotInStoreError` unless a
  ``fallback`` backend is given.

``python -m memrl.evaluate SPEC.json OUT.json`` is the subprocess worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memrl.config import Config, load_config, stable_hash
from memrl.utils import package_versions

log = logging.getLogger(__name__)

_SPEC_SECTIONS = ("data", "model", "search", "finetune", "sample", "encoder", "metrics")


class NotInStoreError(KeyError):
    """The replay backend has no evaluation for this spec."""


@dataclass(frozen=True)
class EvalSpec:
    """Everything an evaluation depends on; its hash keys the store."""

    settings: dict[str, Any]
    """The config sections that affect the result (data, model, search, finetune, sample, ...)."""
    mask: tuple[int, ...]
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Dataset, base-model and search-space fingerprints (identify inputs not in settings)."""

    @classmethod
    def from_config(cls, cfg: Config, mask, fingerprints: dict[str, str] | None = None) -> EvalSpec:
        tree = cfg.to_dict()
        settings = {k: tree[k] for k in _SPEC_SECTIONS}
        return cls(settings, tuple(int(m) for m in mask), dict(fingerprints or {}))

    def to_config(self) -> Config:
        return load_config(self.settings)

    @property
    def hash(self) -> str:
        return stable_hash(
            {"settings": self.settings, "mask": list(self.mask), "fingerprints": self.fingerprints}, length=24
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalSpec:
        d = json.loads(text)
        return cls(d["settings"], tuple(d["mask"]), d.get("fingerprints", {}))


@dataclass
class Evaluation:
    """Every measured number for one spec; ``ok`` False means a recorded failure."""

    spec_hash: str
    mask: tuple[int, ...]
    metrics: dict[str, float]
    ok: bool = True
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    samples: np.ndarray | None = None
    """Generated images as uint8 (N, C, H, W), kept for render and reports."""
    nearest: np.ndarray | None = None
    """Index into the private set of each sample's nearest training image."""
    cache_hit: bool = False

    def to_row(self) -> dict[str, Any]:
        blob = None
        if self.samples is not None:
            buf = io.BytesIO()
            nearest = self.nearest if self.nearest is not None else np.zeros(0, dtype=np.int64)
            np.savez_compressed(buf, samples=self.samples, nearest=nearest)
            blob = buf.getvalue()
        return {
            "spec_hash": self.spec_hash,
            "mask": json.dumps(list(self.mask)),
            "ok": int(self.ok),
            "error": self.error,
            "metrics": json.dumps(self.metrics),
            "timings": json.dumps(self.timings),
            "versions": json.dumps(self.versions),
            "samples": blob,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Evaluation:
        samples = nearest = None
        if row.get("samples"):
            with np.load(io.BytesIO(row["samples"]), allow_pickle=False) as data:
                samples, nearest = data["samples"], data["nearest"]
        return cls(
            spec_hash=row["spec_hash"],
            mask=tuple(json.loads(row["mask"])),
            metrics=json.loads(row["metrics"]),
            ok=bool(row["ok"]),
            error=row["error"],
            timings=json.loads(row["timings"]),
            versions=json.loads(row["versions"]),
            samples=samples,
            nearest=nearest,
        )

    def to_json(self) -> str:
        row = self.to_row()
        row["samples"] = None if row["samples"] is None else row["samples"].hex()
        return json.dumps(row)

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        row = json.loads(text)
        row["samples"] = None if row["samples"] is None else bytes.fromhex(row["samples"])
        return cls.from_row(row)


class TaskContext:
    """What every evaluation on one task shares: splits, base model, encoder, index, references.

    Built lazily once per (data, model, encoder, metrics) settings and kept in-process.
    """

    _cache: dict[str, TaskContext] = {}

    def __init__(self, cfg: Config) -> None:
        from memrl.data import load_splits
        from memrl.encoders import embed, get_encoder
        from memrl.metrics.memorization import NearestNeighbourIndex, copy_threshold
        from memrl.models import get_base_model
        from memrl.search_space import SearchSpace

        self.splits = load_splits(cfg.data)
        self.base = get_base_model(cfg, self.splits)
        self.space = SearchSpace(self.base.unet, cfg.search.granularity, cfg.search.method)
        self.encoder = get_encoder(cfg, self.splits)
        self.train_embeddings = embed(self.encoder, self.splits.private)
        self.index = NearestNeighbourIndex(self.train_embeddings, cfg.metrics.index, cfg.metrics.faiss_index)
        self.heldout_embeddings = embed(self.encoder, self.splits.heldout)
        self.threshold = copy_threshold(self.index, self.heldout_embeddings, cfg.metrics.copy_quantile)
        self.fingerprints = {
            "data": self.splits.fingerprint,
            "base_model": self.base.fingerprint(),
            "search_space": self.space.signature,
        }

    @classmethod
    def get(cls, cfg: Config) -> TaskContext:
        tree = cfg.to_dict()
        key = stable_hash({k: tree[k] for k in ("data", "model", "encoder", "metrics", "search")})
        if key not in cls._cache:
            cls._cache[key] = cls(cfg)
        return cls._cache[key]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def sample_labels(ctx: TaskContext, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels to sample with: a share from the canaries' labels, the rest from held-out labels.

    Returns (labels, is_canary_conditioned).
    """
    n = cfg.sample.num_samples
    n_canary = round(n * cfg.sample.canary_fraction) if len(ctx.splits.canary_index) else 0
    canary = ctx.splits.canaries.labels
    heldout = ctx.splits.heldout.labels
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


def evaluate_spec(spec: EvalSpec) -> Evaluation:
    """Fine-tune, sample and score one mask. Pure function of ``spec``; raises on failure."""
    from memrl.finetune import finetune

    start = time.perf_counter()
    cfg = spec.to_config()
    ctx = TaskContext.get(cfg)
    context_time = time.perf_counter() - start
    model, ft = finetune(ctx.base, ctx.splits.finetune_set(), ctx.space.prefixes(np.array(spec.mask)), cfg)
    if ft.diverged:
        raise FloatingPointError(f"fine-tune diverged: {ft.stop_reason}")
    result = score_model(model, ctx, cfg, spec.mask, spec.hash)
    result.metrics["finetune_loss"] = ft.final_loss
    result.metrics["trainable_params"] = float(ft.trainable_params)
    result.metrics["trainable_fraction"] = ft.trainable_fraction
    result.timings.update(context=context_time, finetune=ft.wall_time, total=time.perf_counter() - start)
    return result


def score_model(model, ctx: TaskContext, cfg: Config, mask, spec_hash: str = "") -> Evaluation:
    """Every metric of a (fine-tuned) model on ``ctx``'s task: losses, samples, copies, quality."""
    from memrl.encoders import embed
    from memrl.metrics.memorization import (
        copy_scores,
        denoising_loss,
        extraction_count,
        noise_norm,
    )
    from memrl.metrics.quality import fid_kid
    from memrl.sampling import sample

    splits, m = ctx.splits, cfg.metrics
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    is_canary_private = torch.zeros(len(splits.private), dtype=torch.bool)
    is_canary_private[splits.canary_index] = True
    train_loss = denoising_loss(model, splits.private.images, splits.private.labels, m.loss_timesteps)
    heldout_loss = denoising_loss(model, splits.heldout.images, splits.heldout.labels, m.loss_timesteps)
    timings["losses"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels, is_canary = sample_labels(ctx, cfg)
    s = cfg.sample
    samples = sample(model, labels, steps=s.steps, guidance=s.guidance, seed=cfg.finetune.seed)
    timings["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample_emb = embed(ctx.encoder, samples)
    scores = copy_scores(sample_emb, ctx.index, ctx.threshold, splits.canary_index, is_canary, m.ratio_test)
    _, nearest = ctx.index.search(sample_emb, 1)
    extracted, match_frac = extraction_count(samples, splits.private.images, m.extraction_threshold)
    quality = fid_kid(ctx.encoder, samples, splits.heldout.images, m.kid_subset_size)
    norms = {}
    canary_labels = splits.canaries.labels
    if canary_labels is not None and splits.heldout.labels is not None:
        norms["noise_norm_canary"] = float(noise_norm(model, canary_labels, m.noise_norm_timesteps).mean())
        norms["noise_norm_heldout"] = float(
            noise_norm(model, splits.heldout.labels[:32], m.noise_norm_timesteps).mean()
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
        **{k: float(v) for k, v in dataclasses.asdict(scores).items()},
        "copy_threshold": ctx.threshold,
        "extracted": float(extracted),
        "extraction_match_fraction": match_frac,
        **quality,
        **norms,
        "trainable_params": 0.0,
        "trainable_fraction": 0.0,
        "group_fraction": ctx.space.group_fraction(np.array(mask)),
    }
    return Evaluation(
        spec_hash=spec_hash,
        mask=tuple(int(v) for v in mask),
        metrics=metrics,
        timings=timings,
        versions=package_versions(),
        samples=_to_uint8(samples),
        nearest=nearest[:, 0].numpy(),
    )


def _failure(spec: EvalSpec, reason: str) -> Evaluation:
    return Evaluation(spec.hash, spec.mask, {}, ok=False, error=reason, versions=package_versions())


def _run_inprocess(spec: EvalSpec) -> Evaluation:
    try:
        return evaluate_spec(spec)
    except (FloatingPointError, RuntimeError, ValueError, MemoryError) as exc:
        log.warning("evaluation %s failed: %s", spec.hash, exc)
        return _failure(spec, f"{type(exc).__name__}: {exc}")


def _run_subprocess(spec: EvalSpec, timeout: float | None = None) -> Evaluation:
    with tempfile.TemporaryDirectory(prefix="memrl-eval-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "evaluation.json"
        spec_path.write_text(spec.to_json())
        cmd = [sys.executable, "-m", "memrl.evaluate", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return _failure(spec, f"worker timed out after {timeout} s")
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return _failure(spec, f"worker exited with code {proc.returncode}: {' | '.join(tail)}")
        return Evaluation.from_json(out_path.read_text())


class Evaluator:
    """Cached evaluation of specs on a backend.

    Args:
        store: where results live (a repeated spec costs nothing).
        backend: ``inprocess``, ``subprocess`` or ``replay``.
        fallback: for ``replay``, the live backend to use for specs not in the store (None: raise).
    """

    def __init__(
        self, store, backend: str = "inprocess", fallback: str | None = None, timeout: float | None = None
    ) -> None:
        if backend not in ("inprocess", "subprocess", "replay"):
            raise ValueError(f"backend={backend!r} is not inprocess, subprocess or replay")
        self.store, self.backend, self.fallback, self.timeout = store, backend, fallback, timeout
        self.hits = self.misses = 0

    def evaluate(self, spec: EvalSpec) -> Evaluation:
        found = self.store.get(spec.hash)
        if found is not None:
            self.hits += 1
            found.cache_hit = True
            return found
        backend = self.backend
        if backend == "replay":
            if self.fallback is None:
                raise NotInStoreError(
                    f"spec {spec.hash} (mask {list(spec.mask)}) is not in the store "
                    f"{self.store.path}; evaluate it with a live backend first, or set a fallback"
                )
            backend = self.fallback
        self.misses += 1
        result = _run_subprocess(spec, self.timeout) if backend == "subprocess" else _run_inprocess(spec)
        self.store.put(result, spec)
        return result


def _worker(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = EvalSpec.from_json(spec_path.read_text())
    try:
        result = evaluate_spec(spec)
    except Exception as exc:  # the worker reports every failure to its parent
        traceback.print_exc()
        result = _failure(spec, f"{type(exc).__name__}: {exc}")
    out_path.write_text(result.to_json())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_worker(sys.argv[1:]))
