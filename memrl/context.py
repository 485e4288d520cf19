"""What every evaluation of one task shares, and the tasks of a config.

* :func:`architecture_space`: the search space, read off the base UNet's architecture (no weights).
* :class:`TaskContext`: the splits, the search space, the fingerprints, and (built when first
  needed) the base model, the encoder, the FAISS index over training embeddings and the copy
  threshold. ``ctx.spec(mask)`` is the EvalSpec of a mask on this task.
* :func:`suite`: the tasks of a config's ``env.tasks`` (name, held-out flag, config);
  :func:`task_config`, :func:`resolve_task`, :func:`full_unet`: one task's config.

It knows nothing of where evaluations run (:mod:`memrl.evaluator`) or of rewards
(:mod:`memrl.task`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memrl.config import Config, load_config, task_overrides
from memrl.data import ImageSet, load_splits
from memrl.encoders import embed, get_encoder
from memrl.errors import ConfigError, ModelError
from memrl.metrics.memorization import NearestNeighbourIndex, copy_threshold, extraction_threshold
from memrl.models import build_unet, get_base_model
from memrl.models.base import shipped_fingerprint
from memrl.models.stable_diffusion import (
    TextConditionedModel,
    captions_of,
    decode_latents,
    encode_latents,
    encode_prompts,
    is_pipeline_folder,
    load_components,
)
from memrl.search_space import SearchSpace
from memrl.spec import EvalSpec, spec_settings
from memrl.utils import stable_hash

__all__ = [
    "TaskContext",
    "TaskEntry",
    "architecture_space",
    "full_unet",
    "resolve_task",
    "suite",
    "task_config",
]

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from memrl.data.splits import DataSplits
    from memrl.metrics.memorization import NearestNeighbourIndex
    from memrl.models.stable_diffusion import Components
    from memrl.models.unet import DiffusionModel


@functools.lru_cache(maxsize=32)
def _architecture_space(
    model_path: str | None, model_json: str, resolution: int, channels: int, granularity: str, method: str
) -> SearchSpace:

    from diffusers import UNet2DConditionModel

    if model_path is None:
        cfg = load_config(
            {"model": json.loads(model_json), "data": {"resolution": resolution, "channels": channels}}
        )
        with torch.device("meta"):
            unet = build_unet(cfg)
    else:
        folder = Path(model_path)
        folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model.path={model_path!r}: no diffusers UNet here (expected config.json in it or in "
                "its unet/ folder); point model.path at a folder written by save_pretrained"
            )
        try:
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model.path={model_path!r}: {folder / 'config.json'} is not a diffusers UNet config "
                f"({first[:150]}); point model.path at a folder written by save_pretrained"
            ) from None
    return SearchSpace(unet, granularity, method)


def architecture_space(cfg: Config) -> SearchSpace:
    """The task's search space, read off the base UNet's architecture (no weights, no training)."""

    return _architecture_space(
        cfg.model.path,
        json.dumps(cfg.model.__dict__, sort_keys=True),
        cfg.data.resolution,
        cfg.data.channels,
        cfg.search.granularity,
        cfg.search.method,
    )


class TaskContext:
    """What every evaluation of one task shares. Build with :meth:`get` (cached per settings).

    Cheap parts are built at once (splits, search space, fingerprints); the base model, encoder,
    index and threshold when first used, so a replayed task never trains an encoder.
    """

    _cache: dict[str, TaskContext] = {}

    def __init__(self, cfg: Config) -> None:

        self.cfg = cfg
        self.settings = spec_settings(cfg)
        """What every spec of this task shares (one dict for all: specs are never changed)."""
        self.space = architecture_space(cfg)  # first: a bad model.path fails before data is loaded
        self.splits = load_splits(cfg.data)
        self._specs: dict[tuple[int, ...], EvalSpec] = {}

    @classmethod
    def get(cls, cfg: Config) -> TaskContext:
        key = stable_hash(spec_settings(cfg))
        if key not in cls._cache:
            cls._cache[key] = cls(cfg)
        return cls._cache[key]

    @functools.cached_property
    def sd(self) -> Components | None:
        """The Stable Diffusion components when ``model.path`` is a pipeline folder, else None."""

        if not is_pipeline_folder(self.cfg.model.path):
            return None
        return load_components(str(Path(str(self.cfg.model.path)).resolve()))

    @functools.cached_property
    def prompts(self) -> list[str]:
        """Stable Diffusion path: the task's distinct captions, then the empty prompt (null label)."""

        template = self.cfg.data.caption_template
        seen = [
            c
            for part in (self.splits.base, self.splits.private, self.splits.heldout)
            for c in captions_of(part, template)
        ]
        return [*dict.fromkeys(c for c in seen if c), ""]

    @functools.cached_property
    def model_splits(self) -> DataSplits:
        """The splits the model trains and is scored on: the images themselves, or on the Stable
        Diffusion path their VAE latents, labelled by caption (an index into :attr:`prompts`)."""

        sd = self.sd
        if sd is None:
            return self.splits
        index = {p: i for i, p in enumerate(self.prompts)}
        null = len(self.prompts) - 1

        def latent(part: Any) -> Any:
            ids = [index.get(c, null) for c in captions_of(part, self.cfg.data.caption_template)]
            return ImageSet(
                encode_latents(sd, part.images),
                torch.tensor(ids),
                None,
                part.name,
                {**part.meta, "latents": sd.vae_fingerprint},
                part.source_digest,
            )

        s = self.splits
        return dataclasses.replace(
            s, base=latent(s.base), private=latent(s.private), heldout=latent(s.heldout)
        )

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Model outputs as images in [-1, 1] (decoded through the VAE on the Stable Diffusion path)."""
        if self.sd is None:
            return samples

        return decode_latents(self.sd, samples)

    @functools.cached_property
    def base(self) -> DiffusionModel:
        """The base model (shipped, cached, pretrained once, or a pipeline's UNet conditioned on
        the task's prompts); checked against the search space."""

        if self.sd is not None:
            model: Any = TextConditionedModel(
                self.sd.unet, encode_prompts(self.sd, self.prompts), self.sd.path
            )
            config = self.sd.path / "scheduler" / "scheduler_config.json"
            model.scheduler_config = json.loads(config.read_text()) if config.is_file() else None
        else:
            model = get_base_model(self.cfg, self.splits)
        loaded = SearchSpace(model.unet, self.space.granularity, self.space.method)
        if loaded.signature != self.space.signature:
            raise ModelError(
                f"the base model's architecture ({loaded.k} groups) differs from the one its config "
                f"describes ({self.space.k} groups); delete the cached model or fix model.*"
            )
        return model

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Fingerprints of the inputs that are not settings: data, base-model weights, search space."""

        base = shipped_fingerprint(self.cfg, self.splits) if self.cfg.model.path is None else None
        if self.sd is not None:
            base = self.sd.fingerprint
        return {
            "data": self.splits.fingerprint,
            "base_model": base or self.base.fingerprint(),
            "search_space": self.space.signature,
        }

    def spec(self, mask: np.ndarray | Sequence[int]) -> EvalSpec:
        """The EvalSpec of ``mask`` (validated against the search space) on this task; made once
        per mask (a replayed search asks for the same few thousand specs again and again)."""
        key = tuple(int(m) for m in self.space.validate(mask))
        if key not in self._specs:
            self._specs[key] = EvalSpec(self.settings, key, self.fingerprints)
        return self._specs[key]

    @functools.cached_property
    def encoder(self) -> nn.Module:

        return get_encoder(self.cfg, self.splits)

    @functools.cached_property
    def train_embeddings(self) -> torch.Tensor:

        return embed(self.encoder, self.splits.private)

    @functools.cached_property
    def heldout_embeddings(self) -> torch.Tensor:

        return embed(self.encoder, self.splits.heldout)

    @functools.cached_property
    def index(self) -> NearestNeighbourIndex:

        m = self.cfg.metrics
        return NearestNeighbourIndex(self.train_embeddings, m.index, m.faiss_index)

    @functools.cached_property
    def threshold(self) -> float:

        return copy_threshold(self.index, self.heldout_embeddings, self.cfg.metrics.copy_quantile)

    @functools.cached_property
    def extraction_threshold(self) -> float:
        """The tiled-L2 extraction threshold: fixed, or calibrated on held-out images
        (``metrics.extraction_quantile``)."""

        m = self.cfg.metrics
        if m.extraction_quantile is None:
            return m.extraction_threshold
        splits = self.splits
        return extraction_threshold(splits.private.images, splits.heldout.images, m.extraction_quantile)


@dataclass(frozen=True)
class TaskEntry:
    """One entry of ``env.tasks``: its name, held-out flag and full config."""

    name: str
    heldout: bool
    cfg: Config


def full_unet(cfg: Config) -> Config:
    """``cfg`` fine-tuning every parameter of the UNet (mask of ones at block granularity): the
    MemControl paper's full fine-tuning, which memrl compares masks against."""
    return cfg.with_changes({"search.granularity": "block", "search.method": "full"})


def task_config(cfg: Config, task: dict[str, Any] | str) -> Config:
    """``cfg`` with ``data`` set to ``task``: an ``env.tasks`` entry or a data source."""
    overrides = {"source": task} if isinstance(task, str) else task
    return cfg.with_changes(task_overrides(overrides))


def resolve_task(cfg: Config, task: int | str | dict[str, Any]) -> Config:
    """The config of one task: an index or name into ``env.tasks``, a data source, or data overrides."""
    entries = suite(cfg)
    if isinstance(task, int):
        if not 0 <= task < len(entries):
            raise ConfigError(f"task {task} is outside 0..{len(entries) - 1} (the tasks of env.tasks)")
        return entries[task].cfg
    names = [e.name for e in entries]
    if isinstance(task, str) and task in names:
        return entries[names.index(task)].cfg
    return task_config(cfg, task)


def suite(cfg: Config) -> list[TaskEntry]:
    """The tasks of ``cfg.env.tasks`` (or ``cfg.data`` alone when it lists none)."""
    entries = cfg.env.tasks or [{}]
    return [
        TaskEntry(str(t.get("name", f"task{i}")), bool(t.get("heldout", False)), task_config(cfg, t))
        for i, t in enumerate(entries)
    ]
