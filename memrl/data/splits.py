"""Seeded splits: base (pretraining), private (fine-tuning, with duplicated canaries), held-out."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memrl.config import DataConfig
from memrl.data.bundled import BASE_MIX, BUNDLED, base_count, bundled, reserved_order
from memrl.data.imageset import ImageSet, load_folder, load_npz
from memrl.errors import DataError
from memrl.utils import stable_hash

__all__ = [
    "BASE_VERSIONS",
    "SHIFTS",
    "DataSplits",
    "MIN_IMAGES",
    "base_split",
    "fit_sizes",
    "load_splits",
    "source_set",
    "task_pool",
    "usable_count",
]

MIN_IMAGES = 8
"""The fewest images a dataset may have: at least 4 to fine-tune on and 4 held out."""


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Everything one task needs: the base domain, the private set, held-out images, canaries."""

    base: ImageSet
    private: ImageSet
    heldout: ImageSet
    canary_index: torch.Tensor
    """Indices into ``private`` of the canary images."""
    duplication: int

    @property
    def canaries(self) -> ImageSet:
        return self.private.subset(self.canary_index, name=f"{self.private.name}-canaries")

    @property
    def fingerprint(self) -> str:
        """Changes when any split, the canaries or the duplication changes."""
        return stable_hash(
            [
                self.base.fingerprint,
                self.private.fingerprint,
                self.heldout.fingerprint,
                self.canary_index.tolist(),
                self.duplication,
            ]
        )

    def finetune_set(self) -> ImageSet:
        """The private set with each canary repeated ``duplication`` times in all."""
        extra = self.canary_index.repeat(max(self.duplication - 1, 0))
        index = torch.cat([torch.arange(len(self.private)), extra])
        return self.private.subset(index, name=f"{self.private.name}-finetune")


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "invert": lambda images: -images,  # in [-1, 1]: the negative
    "rot90": lambda images: torch.rot90(images, 1, (2, 3)),
}
"""``data.shift``: controlled domain shifts of a task's images (the base split is left alone)."""


def source_set(cfg: DataConfig) -> ImageSet:
    """Every image of ``data.source``: a bundled name, an .npz file or a folder."""
    if cfg.source in BUNDLED and cfg.source != "mnist":
        return bundled(cfg.source, cfg.resolution, cfg.channels)
    path = Path(cfg.source)
    if path.suffix == ".npz":
        return load_npz(path, cfg.resolution, cfg.resize)
    if path.is_dir():
        return load_folder(path, cfg.resolution, cfg.channels, cfg.resize)
    names = ", ".join(n for n in BUNDLED if n != "mnist")
    raise DataError(
        f"data.source={cfg.source!r} is not a bundled dataset ({names}), an existing folder of images "
        "or an .npz file"
    )


BASE_VERSIONS = (None, "mix")
"""``data.base``: None, base model v1's 2,000 MNIST digits; ``mix``, base model v2's mix."""


def base_split(cfg: DataConfig) -> ImageSet:
    """The images the tiny base UNet is pretrained on: ``base_size`` MNIST digits (``data.base``
    unset: base model v1), or the reserved share of every training source (``mix``: v2, see
    :data:`memrl.data.bundled.BASE_MIX`), unlabelled sources with label -1 (the null label).
    Built once per process and setting (every task of a suite shares it)."""
    return _base_split(cfg.base, cfg.resolution, cfg.channels, cfg.base_size)


@functools.lru_cache(maxsize=4)
def _base_split(base: str | None, resolution: int, channels: int, base_size: int) -> ImageSet:
    if base is None:
        mnist = bundled("mnist", resolution, channels)
        g = torch.Generator().manual_seed(1234)
        index = torch.randperm(len(mnist), generator=g)[:base_size]
        return mnist.subset(index, name="base")
    parts = []
    for name in BASE_MIX:
        source = bundled(name, resolution, channels)
        index = reserved_order(name, len(source))[: base_count(name, len(source))]
        part = source.subset(index)
        labels = part.labels if part.labels is not None else torch.full((len(part),), -1)
        parts.append((part, labels))
    return ImageSet(
        images=torch.cat([p.images for p, _ in parts]),
        labels=torch.cat([labels for _, labels in parts]),
        name="base",
        meta={"base": base, "sources": {p.meta["source"]: p.fingerprint for p, _ in parts}},
        source_digest=stable_hash([p.fingerprint for p, _ in parts]),
    )


def task_pool(cfg: DataConfig, source: ImageSet) -> torch.Tensor:
    """Indices of ``source`` a task may draw its private and held-out images from: all of them,
    except on base model v2 (``data.base: mix``) the share of a bundled source it was trained on."""
    if cfg.base is None or cfg.source not in BASE_MIX:
        return torch.arange(len(source))
    order = reserved_order(cfg.source, len(source))
    return order[base_count(cfg.source, len(source)) :].sort().values


def fit_sizes(cfg: DataConfig, n_images: int) -> DataConfig:
    """``cfg`` with split sizes that fit a dataset of ``n_images``: the held-out split takes a
    quarter (at least 4, at most ``heldout_size``), the private split the rest (at most
    ``private_size``), and canaries at most an eighth of the private split. Below
    :data:`MIN_IMAGES` images there is nothing to measure: a DataError says so."""
    if n_images < MIN_IMAGES:
        raise DataError(
            f"{cfg.source}: {n_images} usable images; memrl needs at least {MIN_IMAGES} "
            "(4 to fine-tune on, 4 held out to measure memorization against)"
        )
    if n_images >= cfg.private_size + cfg.heldout_size:
        return cfg
    heldout = min(cfg.heldout_size, max(4, n_images // 4))
    private = min(cfg.private_size, n_images - heldout)
    canaries = min(cfg.canaries, max(1, private // 8)) if cfg.canaries else 0
    return dataclasses.replace(cfg, private_size=private, heldout_size=heldout, canaries=canaries)


def usable_count(cfg: DataConfig) -> int:
    """Images of the source that the splits may use (after ``private_classes``)."""
    source = source_set(cfg)
    pool = task_pool(cfg, source)
    if cfg.private_classes is None or source.labels is None:
        return len(pool)
    return int(torch.isin(source.labels[pool], torch.tensor(cfg.private_classes)).sum())


def load_splits(cfg: DataConfig) -> DataSplits:
    """Build the seeded base / private / held-out splits and pick the canaries."""
    source = source_set(cfg)
    if source.channels != cfg.channels:
        raise DataError(f"{cfg.source}: images have {source.channels} channels, data.channels={cfg.channels}")
    pool = task_pool(cfg, source)
    if cfg.private_classes is not None:
        if source.labels is None:
            raise DataError(f"data.private_classes is set but {cfg.source} has no labels; remove it")
        keep = torch.isin(source.labels[pool], torch.tensor(cfg.private_classes))
        pool = pool[keep]
    need = cfg.private_size + cfg.heldout_size
    if len(pool) < need:
        raise DataError(
            f"{cfg.source}: {len(pool)} usable images, but data.private_size + data.heldout_size = "
            f"{need}; lower them or add images"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    pool = pool[torch.randperm(len(pool), generator=g)]
    settings: dict[str, Any] = {"seed": cfg.seed, "classes": cfg.private_classes}
    if cfg.shift is not None:
        if cfg.shift not in SHIFTS:
            raise DataError(
                f"data.shift={cfg.shift!r} is not a shift; choose one of {', '.join(SHIFTS)} or leave it "
                "unset"
            )
        settings["shift"] = cfg.shift
    private = source.subset(pool[: cfg.private_size], "private", {**settings, "split": "private"})
    heldout = source.subset(pool[cfg.private_size : need], "heldout", {**settings, "split": "heldout"})
    if cfg.shift is not None:
        shift = SHIFTS[cfg.shift]
        private, heldout = (
            dataclasses.replace(part, images=shift(part.images)) for part in (private, heldout)
        )
    canary_index = torch.randperm(cfg.private_size, generator=g)[: cfg.canaries].sort().values
    return DataSplits(
        base=base_split(cfg),
        private=private,
        heldout=heldout,
        canary_index=canary_index,
        duplication=cfg.duplication,
    )
