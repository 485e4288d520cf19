"""Datasets: ImageSet, the bundled digits, folders and .npz files, seeded splits."""

from memrl.data.imageset import DataError, ImageSet, load_folder, load_npz, resize_images
from memrl.data.splits import DataSplits, base_split, load_splits

__all__ = [
    "DataError",
    "DataSplits",
    "ImageSet",
    "base_split",
    "load_folder",
    "load_npz",
    "load_splits",
    "resize_images",
]
