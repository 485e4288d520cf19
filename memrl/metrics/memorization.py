"""Memorization metrics: nearest-neighbour copy detection (FAISS), pixel extraction, loss gap,
and Wen et al.'s noise-prediction norm.

Each score is a plain function of tensors, tested against a brute-force reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memrl.registry import FAISS_INDEXES, NN_BACKENDS  # noqa: F401  (re-exported)
from memrl.training import noise_scheduler

__all__ = [
    "CopyScores",
    "NearestNeighbourIndex",
    "copy_scores",
    "copy_threshold",
    "denoising_loss",
    "extraction_count",
    "extraction_threshold",
    "faiss_available",
    "noise_norm",
    "pia_error",
    "tiled_l2_distance",
]

log = logging.getLogger(__name__)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NearestNeighbourIndex:
    """Cosine nearest neighbours over L2-normalised training embeddings.

    Args:
        train: (N, D) training embeddings (normalised here).
        backend: ``faiss`` or ``torch`` (exact matmul). ``faiss`` falls back to ``torch`` with a
            warning when faiss is not installed; both return the same neighbours for ``flat``.
        index: FAISS index type: ``flat`` (exact ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``,
            approximate) or ``hnsw`` (``IndexHNSWFlat``, approximate).
        nlist / nprobe / hnsw_m: parameters of the approximate indexes.
        use_gpu: move a flat FAISS index to the GPU when faiss-gpu and a GPU are present.
    """

    def __init__(
        self,
        train: torch.Tensor,
        backend: str = "faiss",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        hnsw_m: int = 32,
        use_gpu: bool = True,
    ) -> None:
        if train.ndim != 2 or len(train) == 0:
            raise ValueError(f"train embeddings must be a non-empty (N, D) tensor, got {tuple(train.shape)}")
        if backend == "faiss" and not faiss_available():
            log.warning("faiss is not installed; using the exact torch backend (pip install faiss-cpu)")
            backend = "torch"
        if backend not in ("faiss", "torch"):
            raise ValueError(f"backend={backend!r} is not 'faiss' or 'torch'")
        if backend == "torch" and index != "flat":
            raise ValueError(f"index={index!r} needs the faiss backend; the torch backend is exact")
        self.backend, self.kind = backend, index
        self.train = F.normalize(train.float(), dim=1).contiguous()
        self.dim = self.train.shape[1]
        if backend == "faiss":
            self._index = self._build_faiss(index, nlist, nprobe, hnsw_m, use_gpu)

    def _build_faiss(self, index: str, nlist: int | None, nprobe: int, hnsw_m: int, use_gpu: bool):
        import faiss

        data = self.train.numpy()
        built: Any
        if index == "flat":
            built = faiss.IndexFlatIP(self.dim)
        elif index == "ivf":
            nlist = nlist or max(1, int(np.sqrt(len(data))))
            built = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            sample = np.random.default_rng(0).permutation(len(data))[: 64 * nlist]
            built.train(data[np.sort(sample)])  # k-means on a sample: 64 points per list suffice
            built.nprobe = nprobe
        elif index == "hnsw":
            built = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"index={index!r} is not one of flat, ivf, hnsw")
        if (
            use_gpu
            and index == "flat"
            and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0
        ):
            built = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, built)
        built.add(data)
        return built

    def __len__(self) -> int:
        return len(self.train)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` cosine similarities and training indices for each query, best first."""
        k = min(k, len(self))
        q = F.normalize(queries.float(), dim=1).contiguous()
        if self.backend == "torch":
            sims, idx = (q @ self.train.T).topk(k, dim=1)
            return sims, idx
        sims, idx = self._index.search(q.numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()


def copy_threshold(index: NearestNeighbourIndex, heldout: torch.Tensor, quantile: float) -> float:
    """Near-copy threshold: the ``quantile`` of held-out real images' nearest-training similarity.

    A held-out image is, by construction, not a copy; a sample closer to the training set than
    (say) 99% of held-out images are is called a near-copy.
    """
    sims, _ = index.search(heldout, 1)
    return float(torch.quantile(sims[:, 0], quantile))


@dataclass
class CopyScores:
    nn_similarity_mean: float
    nn_similarity_q50: float
    nn_similarity_q95: float
    near_copy_fraction: float
    amd: float
    """Average minimum cosine distance to the training set (Bhattacharjee et al.); lower = closer."""
    distinct_copied: int
    canary_copy_fraction: float
    """Share of canary-conditioned samples that are near-copies of a canary."""


def copy_scores(
    samples: torch.Tensor,
    index: NearestNeighbourIndex,
    threshold: float,
    canary_train_index: torch.Tensor | None = None,
    canary_sample_mask: torch.Tensor | None = None,
    ratio_test: float = 0.0,
) -> CopyScores:
    """Nearest-neighbour copy scores of sample embeddings against the training index.

    ``ratio_test`` > 0 also requires (1 - sim_1) / (1 - sim_2) < ratio_test (a unique match).
    """
    sims, idx = index.search(samples, 2)
    nearest = sims[:, 0]
    copy = nearest >= threshold
    if ratio_test > 0 and sims.shape[1] > 1:
        ratio = (1 - sims[:, 0]) / (1 - sims[:, 1]).clamp_min(1e-8)
        copy &= ratio < ratio_test
    canary_frac = float("nan")
    if canary_train_index is not None and canary_sample_mask is not None and canary_sample_mask.any():
        hits_canary = torch.isin(idx[:, 0], canary_train_index.to(idx.dtype))
        canary_frac = float((copy & hits_canary)[canary_sample_mask].float().mean())
    return CopyScores(
        nn_similarity_mean=float(nearest.mean()),
        nn_similarity_q50=float(nearest.quantile(0.5)),
        nn_similarity_q95=float(nearest.quantile(0.95)),
        near_copy_fraction=float(copy.float().mean()),
        amd=float((1 - nearest).mean()),
        distinct_copied=int(idx[copy, 0].unique().numel()),
        canary_copy_fraction=canary_frac,
    )


def tiled_l2_distance(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """(len(a), len(b)) matrix of the largest per-tile RMS pixel distance (images in [-1, 1]).

    As in Carlini et al. 2023 / the MemControl reference: split each image into ``tiles`` x
    ``tiles`` tiles; two images match when even their most different tile is close.
    """
    n, c, h, w = a.shape
    th, tw = h // tiles, w // tiles

    def tiled(x: torch.Tensor) -> torch.Tensor:
        x = (x[..., : th * tiles, : tw * tiles] + 1) / 2
        x = x.reshape(len(x), c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(len(x), tiles * tiles, -1)

    ta, tb = tiled(a.float()), tiled(b.float())
    d = torch.cdist(ta.transpose(0, 1), tb.transpose(0, 1))  # (tiles², n_a, n_b)
    return (d / ta.shape[-1] ** 0.5).amax(dim=0)


def extraction_threshold(
    train: torch.Tensor, heldout: torch.Tensor, quantile: float, tiles: int = 4
) -> float:
    """Extraction threshold calibrated on held-out images: the ``quantile`` of their nearest
    tiled-L2 distance to ``train``. Held-out images are, by construction, not extracted; a sample
    must be closer to a training image than all but a ``quantile`` share of them are."""
    nearest = tiled_l2_distance(heldout, train, tiles).amin(dim=1)
    return float(torch.quantile(nearest, quantile))


def extraction_count(
    samples: torch.Tensor, train: torch.Tensor, threshold: float, tiles: int = 4, clique: int = 3
) -> tuple[int, float]:
    """Training images extracted: matched (tiled L2 < threshold) by at least ``clique`` samples.

    Returns (number of extracted training images, fraction of samples matching any training image).
    """
    d = tiled_l2_distance(samples, train, tiles)
    match = d < threshold
    extracted = int((match.sum(dim=0) >= clique).sum())
    return extracted, float(match.any(dim=1).float().mean())


def _noised(model, images: torch.Tensor, timesteps: list[int], seed: int):

    sched = noise_scheduler(model)
    g = torch.Generator().manual_seed(seed)
    for t in timesteps:
        noise = torch.randn(images.shape, generator=g)
        tt = torch.full((len(images),), t, dtype=torch.long)
        yield sched.add_noise(images, noise, tt), tt, noise


@torch.no_grad()
def denoising_loss(
    model, images: torch.Tensor, labels: torch.Tensor | None, timesteps: list[int], seed: int = 0
) -> torch.Tensor:
    """Per-image epsilon-prediction MSE averaged over fixed ``timesteps`` and seeded noise.

    Comparing it on training vs held-out images is a loss-based membership signal (no sampling).
    """
    model.eval()
    device = next(model.parameters()).device
    labels = model.labels_or_null(labels, len(images)).to(device)
    total = torch.zeros(len(images))
    for xt, tt, noise in _noised(model, images, timesteps, seed):
        pred = model(xt.to(device), tt.to(device), labels)
        total += (pred - noise.to(device)).square().flatten(1).mean(1).cpu()
    return total / len(timesteps)


@torch.no_grad()
def pia_error(model, images: torch.Tensor, labels: torch.Tensor | None, timesteps: list[int]) -> torch.Tensor:
    """Proximal initialisation attack (PIA, Kong et al., ICLR 2024): per image, the model's own noise
    prediction at t = 0 is taken as the noise, the image is noised with it deterministically to
    each of ``timesteps``, and the error of the prediction there against it is averaged. Training
    images, whose denoising trajectory the model has learned, give lower errors. No random noise:
    the same image always gets the same score."""

    model.eval()
    sched = noise_scheduler(model)
    device = next(model.parameters()).device
    x0 = images.to(device)
    labels = model.labels_or_null(labels, len(images)).to(device)
    zero = torch.zeros(len(images), dtype=torch.long, device=device)
    eps0 = model(x0, zero, labels)
    total = torch.zeros(len(images))
    for t in timesteps:
        tt = torch.full((len(images),), t, dtype=torch.long, device=device)
        xt = sched.add_noise(x0, eps0, tt)
        total += (model(xt, tt, labels) - eps0).square().flatten(1).mean(1).cpu()
    return total / len(timesteps)


@torch.no_grad()
def noise_norm(model, labels: torch.Tensor, timesteps: list[int], seed: int = 0) -> torch.Tensor:
    """Wen et al. (ICLR 2024): per-label norm of eps(x_t, c) - eps(x_t, null), averaged over
    ``timesteps``, at x_t drawn from N(0, I) as at the start of sampling. Memorized prompts give
    large conditional noise predictions. Normalised by sqrt(pixels)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    shape = (len(labels), model.channels, model.resolution, model.resolution)
    device = next(model.parameters()).device
    labels = model.labels_or_null(labels, len(labels)).to(device)
    null = torch.full_like(labels, model.null_label)
    total = torch.zeros(len(labels))
    for t in timesteps:
        x = torch.randn(shape, generator=g).to(device)
        tt = torch.full((len(labels),), t, dtype=torch.long, device=device)
        diff = model(x, tt, labels) - model(x, tt, null)
        total += (diff.flatten(1).norm(dim=1) / diff[0].numel() ** 0.5).cpu()
    return total / len(timesteps)
