"""Pictures of evaluations: generated samples beside their nearest training images."""

from __future__ import annotations

import numpy as np

from memrl.data import ImageSet

__all__ = ["sample_grid"]


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, H, W, 3) uint8."""
    images = images.transpose(0, 2, 3, 1)
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def sample_grid(
    samples: np.ndarray, nearest: np.ndarray, train: ImageSet, n: int = 16, pad: int = 1
) -> np.ndarray:
    """An RGB image: each row pairs a generated sample (left) with its nearest training image."""
    n = min(n, len(samples))
    train_u8 = ((train.images[nearest[:n]].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    left, right = _to_rgb(samples[:n]), _to_rgb(train_u8)
    h, w = left.shape[1:3]
    grid = np.full((n * (h + pad) + pad, 2 * w + 3 * pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        y = pad + i * (h + pad)
        grid[y : y + h, pad : pad + w] = left[i]
        grid[y : y + h, 2 * pad + w : 2 * pad + 2 * w] = right[i]
    return grid
