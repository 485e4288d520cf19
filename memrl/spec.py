"""The value types of an evaluation: what it depends on (:class:`EvalSpec`) and what it measured
(:class:`Evaluation`).

An evaluation is a pure function of its spec, and the spec's hash keys every stored result, the
shipped tables included. So the hash is deliberate:

* it covers the config sections that affect the result (:data:`SPEC_SECTIONS`), the mask, the
  fingerprints of the inputs that are not settings (dataset, base-model weights, search space) and
  the schema version :data:`SPEC_VERSION`;
* settings whose value is ``None`` are left out, so a setting added later with a ``None`` default
  (meaning "as before it existed") keeps every stored hash valid. Any other change to what keys an
  evaluation must bump :data:`SPEC_VERSION`; ``tests/test_spec.py`` pins a reference hash.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memrl.config import Config, load_config
from memrl.utils import stable_hash, without_none

__all__ = ["EvalSpec", "Evaluation", "SPEC_SECTIONS", "SPEC_VERSION", "spec_settings", "with_derived_metrics"]

SPEC_VERSION = 2
SPEC_SECTIONS = ("data", "model", "search", "finetune", "sample", "encoder", "metrics")


def spec_settings(cfg: Config) -> dict[str, Any]:
    """The sections of ``cfg`` an evaluation depends on (:data:`SPEC_SECTIONS`) as plain data (only
    those: the whole tree, ``env.tasks`` above all, costs far more to copy)."""
    return {k: dataclasses.asdict(getattr(cfg, k)) for k in SPEC_SECTIONS}


@dataclass(frozen=True)
class EvalSpec:
    """Everything an evaluation depends on; its hash keys the store."""

    settings: dict[str, Any]
    """The config sections that affect the result (:data:`SPEC_SECTIONS`)."""
    mask: tuple[int, ...]
    fingerprints: dict[str, str] = field(default_factory=dict)
    """``data``, ``base_model`` and ``search_space`` fingerprints (inputs that are not settings)."""
    version: int = SPEC_VERSION

    @classmethod
    def from_config(cls, cfg: Config, mask: Any, fingerprints: dict[str, str] | None = None) -> EvalSpec:
        return cls(spec_settings(cfg), tuple(int(m) for m in mask), dict(fingerprints or {}))

    def to_config(self) -> Config:
        return load_config(self.settings)

    @functools.cached_property
    def hash(self) -> str:
        """The store's key (computed once: a spec is never changed after it is made)."""
        return stable_hash(
            {
                "version": self.version,
                "settings": without_none(self.settings),
                "mask": list(self.mask),
                "fingerprints": self.fingerprints,
            },
            length=24,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalSpec:
        d = json.loads(text)
        return cls(d["settings"], tuple(d["mask"]), d.get("fingerprints", {}), d.get("version", 1))


def with_derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with the metrics that are functions of others added where missing, so rows
    stored before such a metric existed carry it too:

    * ``canary_log_loss_ratio``: log(held-out loss / canary loss). Its change from the base model
      (what the reward's memorization term measures) is how much more, relatively, fine-tuning
      lowered the canaries' loss than held-out images': the base model as the reference of
      difficulty calibration (Watson et al., ICLR 2022, who subtract a reference model's loss),
      applied to log losses, i.e. by ratio. The plain ``canary_loss_gap`` is calibrated by
      difference, which fails when fine-tuning shrinks every loss several times over and the
      canaries started easy.

    A failed evaluation's metrics (empty) come back unchanged.
    """
    if "canary_log_loss_ratio" in metrics or not {"heldout_loss", "canary_loss"} <= metrics.keys():
        return metrics
    held, canary = metrics["heldout_loss"], metrics["canary_loss"]
    ratio = math.log(held / canary) if held > 0 and canary > 0 else math.nan
    return {**metrics, "canary_log_loss_ratio": ratio}


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
    """Generated images as uint8 (N, C, H, W), kept for render and reports (None in tables)."""
    nearest: np.ndarray | None = None
    """Index into the private set of each sample's nearest training image."""
    curve: list[dict[str, Any]] | None = None
    """A checkpointed evaluation's curve (``finetune.checkpoint_every``): one dict per checkpoint,
    ``step`` and the metrics measured there, the last one the final step's (``metrics``)."""
    cache_hit: bool = False
    """A run diagnostic: served from the store rather than computed now."""

    def __post_init__(self) -> None:
        self.metrics = with_derived_metrics(self.metrics)

    def to_json(self) -> str:
        """JSON for the subprocess worker's reply (samples as nested lists)."""
        d = dataclasses.asdict(self)
        for key in ("samples", "nearest"):
            d[key] = None if d[key] is None else d[key].tolist()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        d = json.loads(text)
        d["mask"] = tuple(d["mask"])
        if d["samples"] is not None:
            d["samples"] = np.asarray(d["samples"], dtype=np.uint8)
            d["nearest"] = np.asarray(d["nearest"], dtype=np.int64)
        return cls(**d)
