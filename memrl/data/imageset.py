"""ImageSet and the user's sources: image folders (+ captions.csv) and .npz files.

Pixel values are scaled by their type (8-bit, 16-bit, floats in [0, 1]) to [-1, 1]; values that
are out of range, NaN or infinite are refused with the file and the fix, never silently clipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from memrl.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageSet",
    "MAX_IMAGE_PIXELS",
    "RESIZE_METHOD",
    "first_image",
    "image_digests",
    "load_folder",
    "load_npz",
    "pixel_digest",
    "report_resize",
    "resize_images",
    "scale_pixels",
    "to_unit_range",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_IMAGE_PIXELS = 50_000_000
"""Larger images are refused before decoding (a decompression bomb costs gigabytes)."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images as float (N, C, H, W) in [-1, 1], optional integer labels and/or captions."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[str] | None = None
    name: str = "images"
    meta: dict[str, Any] = field(default_factory=dict)
    """Settings that produced this set (source, split, seed); part of the fingerprint."""
    source_digest: str | None = None
    """:func:`pixel_digest` of the pixels as read, before resizing (set by the loaders); the
    fingerprint hashes it instead of ``images``, so it is the same on every CPU."""
    files: list[str] | None = None
    """Each image's file, relative to its folder (folders only): how reports name an image. Not
    part of the fingerprint (the pixels are)."""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or 0 in self.images.shape[1:]:
            raise DataError(
                f"{self.name}: images must be (N, C, H, W) with non-zero C, H, W, got "
                f"{tuple(self.images.shape)}"
            )
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"{self.name}: {len(self.captions)} captions for {n} images")
        if self.files is not None and len(self.files) != n:
            raise DataError(f"{self.name}: {len(self.files)} file names for {n} images")

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
        """sha256 over pixels, labels, captions and meta: changes whenever any of them does.

        A loaded set hashes its pixels as read (:attr:`source_digest`): a float resize gives
        last-bit differences between CPUs (torch's AVX2 and AVX-512 kernels do), and those must
        not change the fingerprint that keys stored evaluations. A set built by hand hashes its
        pixels as 16-bit values.
        """
        h = hashlib.sha256()
        if self.source_digest is not None:
            h.update(b"source" + self.source_digest.encode())
        else:
            pixels = ((self.images.detach().float().clamp(-1, 1) + 1) * 32767.5).round().to(torch.int32)
            h.update(pixels.numpy().astype("<u2").tobytes())
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
            files=None if self.files is None else [self.files[i] for i in index.tolist()],
            name=name or self.name,
            source_digest=self.source_digest,
            meta={
                **self.meta,
                "subset": hashlib.sha256(index.numpy().tobytes()).hexdigest()[:12],
                **(meta or {}),
            },
        )


def image_digests(images: torch.Tensor) -> list[str]:
    """A short digest of each image's pixels (as 16-bit values): the same image, however it was
    loaded or ordered, gets the same digest."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 32767.5).round().to(torch.int32).numpy()
    return [hashlib.sha256(p.astype("<u2").tobytes()).hexdigest()[:16] for p in pixels]


def pixel_digest(*arrays: torch.Tensor) -> str:
    """sha256 of float pixel arrays (shapes and exact values): the pixels as read, before any step
    whose float result depends on the CPU."""
    h = hashlib.sha256(RESIZE_METHOD.encode())
    for a in arrays:
        h.update(str(tuple(a.shape)).encode() + a.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def to_unit_range(array: np.ndarray, max_value: float) -> torch.Tensor:
    """Pixel values in [0, max_value] to a float tensor in [-1, 1]."""
    return torch.from_numpy(array.astype(np.float32) / max_value * 2 - 1)


def scale_pixels(array: np.ndarray, where: str) -> torch.Tensor:
    """Pixels of any supported type to [-1, 1]: uint8 / 255, uint16 / 65535, bool, floats in
    [0, 1]. Anything else, NaN, infinity or a value out of range is a DataError naming ``where``."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return to_unit_range(array, 255.0)
    if array.dtype == np.uint16:
        return to_unit_range(array, 65535.0)
    if kind == "b":
        return to_unit_range(array, 1.0)
    if kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int((~finite).sum())
            raise DataError(f"{where}: {bad} pixel values are NaN or infinite; fix or drop those images")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{where}: float pixels must lie in [0, 1], found [{lo:g}, {hi:g}]; divide 8-bit "
                "values by 255 (or store them as uint8, 16-bit ones as uint16)"
            )
        return to_unit_range(array, 1.0)
    raise DataError(
        f"{where}: pixels of type {array.dtype} are not supported; store uint8, uint16 or floats in [0, 1]"
    )


RESIZE_METHOD = "bilinear, antialias, align_corners=False"
"""How :func:`resize_images` resizes; part of :func:`pixel_digest` (change it with the method)."""


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize (N, C, H, W) to a square ``resolution`` with antialiasing."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    ).clamp(-1, 1)


def report_resize(where: str | Path, sizes: list[tuple[int, ...]], resolution: int) -> None:
    """Say on one line (a warning) when images are resized to the model's resolution."""
    changed = [hw for hw in sizes if hw != (resolution, resolution)]
    if not changed:
        return
    shapes = sorted(set(changed))
    shown = ", ".join(f"{w}x{h}" for h, w in shapes[:3]) + (" ..." if len(shapes) > 3 else "")
    log.warning(
        "%s: resized %d of %d images (%s px) to %dx%d, the model's data.resolution; fine detail "
        "is lost, and memorization is measured at this size",
        where,
        len(changed),
        len(sizes),
        shown,
        resolution,
        resolution,
    )


_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _read_image(path: Path, channels: int) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1], scaled by its bit depth (16-bit stays 16-bit)."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{path}: {img.width}x{img.height} pixels is more than memrl reads "
                        f"({MAX_IMAGE_PIXELS:,}); downscale the image first"
                    )
                img.load()
                if img.mode in _SIXTEEN_BIT:
                    grey = np.asarray(img, dtype=np.float64)
                    if grey.min() < 0 or grey.max() > 65535:
                        raise DataError(f"{path}: integer pixels outside 0..65535; save it as 8- or 16-bit")
                    array = (grey / 65535.0).astype(np.float32)[None]
                    return array.repeat(3, axis=0) if channels == 3 else array
                if img.mode == "F":
                    raise DataError(
                        f"{path}: floating-point images are not supported; save it as 8- or 16-bit"
                    )
                converted = img.convert("L" if channels == 1 else "RGB")
                array = np.asarray(converted, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a possible decompression bomb ({exc}); downscale it") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read this image ({exc}); remove or replace the file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _read_captions(folder: Path, files: list[Path]) -> list[str] | None:
    csv_path = folder / "captions.csv"
    if not csv_path.exists():
        return None
    raw = csv_path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{csv_path}: UTF-16 text; save it as UTF-8 (with or without a byte-order mark)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{csv_path}: not UTF-8 (byte {exc.start} is {raw[exc.start]:#04x}; latin-1 or another "
            "encoding?); save it as UTF-8"
        ) from None
    known = {p.relative_to(folder).as_posix(): i for i, p in enumerate(files)}
    captions = [""] * len(files)
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"file", "caption"} <= {f.strip() for f in reader.fieldnames}:
        raise DataError(
            f"{csv_path}: needs a header row 'file,caption' (found {reader.fieldnames}); "
            "add it as the first line"
        )
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        name = (row["file"] or "").strip()
        if name not in known:
            raise DataError(
                f"{csv_path}, line {line}: caption for {name!r}, which is not an image in "
                f"{folder}; fix the file name or delete the row"
            )
        captions[known[name]] = row["caption"] or ""
    return captions


def first_image(source: str | Path) -> np.ndarray | None:
    """The first image of a folder or .npz as given, (C, H, W) floats in [0, 1] (greyscale), before
    any resize; None for other sources (bundled sets) or when there is none."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return _read_image(files[0], 1) if files else None
    if path.suffix == ".npz" and path.is_file():
        images, _ = _npz_arrays(path)
        if images.ndim == 3:
            first = images[0]
        else:
            first = images[0, 0] if images.shape[1] in (1, 3) else images[0, ..., 0]
        return ((scale_pixels(np.asarray(first)[None], str(path)) + 1) / 2).numpy()
    return None


def load_folder(folder: str | Path, resolution: int, channels: int = 1, resize: bool = True) -> ImageSet:
    """A folder of images, with one sub-folder per class (labels) or an optional captions.csv."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; point data.source at a folder of images or an .npz")
    named = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in named if p.is_file()]
    skipped = [p.name for p in named if not p.is_file() and not p.is_dir()]
    if skipped:
        log.warning(
            "%s: skipped %d entries named like images that are not regular files (%s); a link to a "
            "device or a broken link is never read",
            folder,
            len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
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
        arrays.append(torch.from_numpy(array)[None] * 2 - 1)
    report_resize(folder, [tuple(a.shape[-2:]) for a in arrays], resolution)
    return ImageSet(
        images=torch.cat([resize_images(a, resolution) for a in arrays]),
        labels=labels,
        captions=_read_captions(folder, files),
        name=folder.name,
        meta={"source": str(folder), "resolution": resolution, "classes": classes},
        source_digest=pixel_digest(*arrays),
        files=[p.relative_to(folder).as_posix() for p in files],
    )


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if not (magic.startswith(b"PK") or magic == b"\x93NUMPY"):
            reason = "not a numpy archive"
        elif "pickle" in str(exc).lower():
            reason = "it holds Python objects, which memrl never unpickles"
        else:
            reason = str(exc).split(";")[0].split(". ")[0].strip() or type(exc).__name__
        raise DataError(f"{path}: cannot read this .npz ({reason}); write it with numpy.savez") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: a single .npy array, not an .npz archive; save it with "
            "numpy.savez(path, images=images, labels=labels)"
        )
    with loaded as data:
        if "images" not in data.files:
            raise DataError(f"{path}: no array named 'images' (found {sorted(data.files)})")
        try:
            images = np.asarray(data["images"])
            labels = np.asarray(data["labels"]) if "labels" in data.files else None
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read its arrays ({exc})") from None
    return images, labels


def load_npz(path: str | Path, resolution: int, resize: bool = True) -> ImageSet:
    """An .npz with ``images`` (N, H, W), (N, C, H, W) or (N, H, W, C) as uint8, uint16 or floats in
    [0, 1] (+ optional integer ``labels``)."""
    path = Path(path)
    images, labels = _npz_arrays(path)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or 0 in images.shape:
        raise DataError(
            f"{path}: 'images' must be a non-empty (N, H, W) or (N, C, H, W) array, got shape {images.shape}"
        )
    if images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        log.info("%s: images are channels-last %s; using them as (N, C, H, W)", path, images.shape)
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise DataError(
            f"{path}: images of shape {images.shape} have {images.shape[1]} channels; give (N, H, W) "
            "greyscale or (N, C, H, W) / (N, H, W, C) with C = 1 or 3"
        )
    tensor = scale_pixels(images, f"{path} 'images'")
    if not resize and (tensor.shape[-1] != resolution or tensor.shape[-2] != resolution):
        raise DataError(f"{path}: images are {tensor.shape[-2]}x{tensor.shape[-1]} px; set data.resize=true")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be one integer per image")
    report_resize(path, [tuple(tensor.shape[-2:])] * len(tensor), resolution)
    return ImageSet(
        images=resize_images(tensor, resolution),
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        name=path.stem,
        meta={"source": str(path), "resolution": resolution},
        source_digest=pixel_digest(tensor),
    )
