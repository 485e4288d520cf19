"""Seeded splits: base (pretraining), private (fine-tuning, with duplicated canaries), held-out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memrl.config import DataConfig, stable_hash
from memrl.data.imageset import (
    DataError,
    ImageSet,
    bundled_mnist,
    bundled_sklearn_digits,
    load_folder,
    load_npz,
)


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


def _source_set(cfg: DataConfig) -> ImageSet:
    if cfg.source == "digits":
        return bundled_sklearn_digits(cfg.resolution)
    path = Path(cfg.source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"data.source={cfg.source!r}: no such .npz file")
        return load_npz(path, cfg.resolution, cfg.resize)
    if path.is_dir():
        return load_folder(path, cfg.resolution, cfg.channels, cfg.resize)
    raise DataError(
        f"data.source={cfg.source!r} is not 'digits', an existing folder of images or an .npz file"
    )


def base_split(cfg: DataConfig) -> ImageSet:
    """The base domain the tiny base UNet is pretrained on: bundled MNIST digits."""
    mnist = bundled_mnist(cfg.resolution)
    if cfg.channels == 3:
        mnist = ImageSet(mnist.images.repeat(1, 3, 1, 1), mnist.labels, None, mnist.name, mnist.meta)
    g = torch.Generator().manual_seed(1234)
    index = torch.randperm(len(mnist), generator=g)[: cfg.base_size]
    return mnist.subset(index, name="base")


def load_splits(cfg: DataConfig) -> DataSplits:
    """Build the seeded base / private / held-out splits and pick the canaries."""
    source = _source_set(cfg)
    if source.channels != cfg.channels:
        raise DataError(f"{cfg.source}: images have {source.channels} channels, data.channels={cfg.channels}")
    pool = torch.arange(len(source))
    if cfg.private_classes is not None:
        if source.labels is None:
            raise DataError(f"data.private_classes is set but {cfg.source} has no labels")
        keep = torch.isin(source.labels, torch.tensor(cfg.private_classes))
        pool = pool[keep]
    need = cfg.private_size + cfg.heldout_size
    if len(pool) < need:
        raise DataError(
            f"{cfg.source}: {len(pool)} usable images, but data.private_size + data.heldout_size = "
            f"{need}; lower them or add images"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    pool = pool[torch.randperm(len(pool), generator=g)]
    settings = {"seed": cfg.seed, "classes": cfg.private_classes}
    private = source.subset(pool[: cfg.private_size], "private", {**settings, "split": "private"})
    heldout = source.subset(pool[cfg.private_size : need], "heldout", {**settings, "split": "heldout"})
    canary_index = torch.randperm(cfg.private_size, generator=g)[: cfg.canaries].sort().values
    return DataSplits(
        base=base_split(cfg),
        private=private,
        heldout=heldout,
        canary_index=canary_index,
        duplication=cfg.duplication,
    )
