"""Datasets: ImageSet, the bundled real datasets, folders and .npz files, seeded splits."""

from memrl.data.bundled import BUNDLED, bundled
from memrl.data.imageset import ImageSet, load_folder, load_npz, resize_images
from memrl.data.splits import DataSplits, base_split, fit_sizes, load_splits, source_set, usable_count
from memrl.errors import DataError

__all__ = [
    "BUNDLED",
    "DataError",
    "DataSplits",
    "ImageSet",
    "base_split",
    "bundled",
    "fit_sizes",
    "load_folder",
    "load_npz",
    "load_splits",
    "resize_images",
    "source_set",
    "usable_count",
]
