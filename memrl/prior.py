"""What the tables say about a new task before any fine-tune: every mask's regret on the training
tasks, weighted by how near each task's descriptor is to the new one's.

One :class:`TransferPrior` serves the zero-shot baselines of the benchmark (nearest task,
k-nearest tasks) and the search policy, which sees its per-mask scores at every step
(``memrl.episode``) and ships them beside its weights (``policy.prior.safetensors``). The search
weights every training task by a Gaussian kernel of its descriptor distance plus a floor
(:meth:`TransferPrior.weighted_sources`): a close relative dominates, and a task near none of
them gets their plain average, which the results then re-weight (:func:`agreement_regret`).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrl.errors import PolicyError
from memrl.utils import atomic_path

__all__ = [
    "AGREEMENT_SHARPNESS",
    "KERNEL_FLOOR",
    "KERNEL_WIDTH",
    "KNN",
    "MAX_PRIOR_VALUE",
    "PRIOR_FEATURES",
    "TransferPrior",
    "agreement_regret",
    "agreement_weights",
    "all_masks",
    "portfolio_regret",
]

MAX_PRIOR_VALUE = 1e6
"""Descriptors and reward terms are of order 1; a prior beyond this was not written by memrl."""
PRIOR_FEATURES = ("transfer_regret", "transfer_rank", "nearest_regret", "mean_regret")
"""Per-mask scores of :meth:`TransferPrior.features` (0 = the sources' best, 1 = their worst; the
rank is the mask's place in ``transfer_regret``'s order over the number of masks)."""
KNN = 3
"""Source tasks the ``knn-tasks`` baseline averages (:meth:`TransferPrior.knn_regret`)."""
KERNEL_WIDTH = 0.3
"""Bandwidth of the search's source weights, in units of the sources' typical spacing (the median
over sources of the distance to the nearest other one)."""
KERNEL_FLOOR = 0.5
"""Weight every source keeps however far it is (a close one's is up to 1 + this). Width and floor
were chosen (from 0.3-1.5 and 0.03-0.5) with the lowest mean regret over 1-8 fine-tunes of
``gp-prior``, averaged over leave one task out and leave one source out, on the 11 training tasks
of 2026-12-02; see bench/README.md."""
AGREEMENT_SHARPNESS = 10.0
"""How fast :func:`agreement_weights` discounts a source that orders the results seen otherwise:
its weight times exp(-10 x its share of discordant pairs). Chosen among 3, 10 and 30 (and 3, 5 or
all sources) on the leave-one-training-task-out folds of 9 training tasks, 2026-12-01, when the
prior was the 3 nearest sources; not re-chosen for the kernel weights."""


def all_masks(k: int) -> np.ndarray:
    """(2**k, k) every mask of ``k`` groups in binary counting order (row i is mask i)."""
    return np.array(list(itertools.product((0, 1), repeat=k)), dtype=np.int8)


@dataclass
class TransferPrior:
    """The source (training) tasks: names, descriptors (S, D) and the memorization, quality and
    parameter terms of every mask (S, M, 3; masks in binary counting order, NaN where missing)."""

    names: list[str]
    descriptors: np.ndarray
    terms: np.ndarray

    @classmethod
    def of_tasks(cls, tasks: list[Any], reward: Any = None) -> TransferPrior:
        """The prior of the :class:`memrl.task.Task` s whose every mask is stored (looked up, never
        evaluated; ``reward``: the RewardConfig whose terms are used, default each task's)."""
        names, descriptors, terms = [], [], []
        for task in tasks:
            found = task.stored_terms(all_masks(task.space.k), reward)
            if np.isfinite(found).all():
                names.append(task.name)
                descriptors.append(task.descriptor())
                terms.append(found)
        if not names:
            return cls([], np.zeros((0, 0)), np.zeros((0, 2 ** tasks[0].space.k if tasks else 0, 3)))
        return cls(names, np.array(descriptors, dtype=float), np.array(terms))

    @property
    def size(self) -> int:
        return len(self.names)

    def regret(self, preference: np.ndarray) -> np.ndarray:
        """(S, M) each source's normalised regret for the preference weights (3 values)."""
        r = -(self.terms @ np.asarray(preference, dtype=float))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            best = np.nanmax(r, axis=1, keepdims=True)
            worst = np.nanmin(r, axis=1, keepdims=True)
        return (best - r) / np.maximum(best - worst, 1e-9)

    def distances(self, descriptor: np.ndarray, sources: list[int]) -> np.ndarray:
        """Euclidean distances from ``descriptor`` to each of ``sources``' descriptors, features
        standardised with those sources' mean and standard deviation (constant ones dropped)."""
        d = self.descriptors[sources]
        mean, std = d.mean(axis=0), d.std(axis=0)
        keep = std > 1e-9
        z = (d[:, keep] - mean[keep]) / std[keep]
        return np.linalg.norm(z - (np.asarray(descriptor)[keep] - mean[keep]) / std[keep], axis=1)

    def _sources(self, exclude: int | None) -> list[int]:
        return [s for s in range(self.size) if s != exclude]

    def spacing(self, sources: list[int]) -> float:
        """The median over ``sources`` of the distance to the nearest other one, in the units of
        :meth:`distances` to them; 1 with fewer than two."""
        if len(sources) < 2:
            return 1.0
        nearest = [
            np.delete(self.distances(self.descriptors[s], sources), i).min() for i, s in enumerate(sources)
        ]
        return max(float(np.median(nearest)), 1e-9)

    def weighted_sources(
        self, descriptor: np.ndarray, preference: np.ndarray, exclude: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every source's regret (S, M) and its weight for a task with ``descriptor`` (S,):
        exp(-d^2 / 2 (:data:`KERNEL_WIDTH` x :meth:`spacing`)^2) + :data:`KERNEL_FLOOR` of its
        descriptor distance d (``exclude``: a source left out, as a training task is when it is
        the one searched)."""
        sources = self._sources(exclude)
        if not sources:
            return np.zeros((0, self.terms.shape[1])), np.zeros(0)
        width = KERNEL_WIDTH * self.spacing(sources)
        distances = self.distances(descriptor, sources)
        weights = np.exp(-0.5 * (distances / width) ** 2) + KERNEL_FLOOR
        return self.regret(preference)[sources], weights

    def transfer_regret(
        self, descriptor: np.ndarray, preference: np.ndarray, exclude: int | None = None
    ) -> np.ndarray:
        """(M,) regret averaged over the sources with :meth:`weighted_sources`' weights."""
        return agreement_regret(*self.weighted_sources(descriptor, preference, exclude), [], np.zeros(0))

    def knn_regret(
        self, descriptor: np.ndarray, preference: np.ndarray, k: int = KNN, exclude: int | None = None
    ) -> np.ndarray:
        """(M,) regret averaged over the ``k`` sources nearest in descriptor, weighted by inverse
        distance (the ``knn-tasks`` baseline)."""
        sources = self._sources(exclude)
        distances = self.distances(descriptor, sources)
        order = np.argsort(distances, kind="stable")[:k]
        regret = self.regret(preference)[[sources[i] for i in order]]
        return agreement_regret(regret, 1.0 / (distances[order] + 1e-6), [], np.zeros(0))

    def features(
        self, descriptor: np.ndarray, preference: np.ndarray, exclude: int | None = None
    ) -> np.ndarray:
        """(M, 4) :data:`PRIOR_FEATURES` of every mask; 0.5 everywhere when no source is left
        (no information), 1 where a mask is missing from the sources' tables."""
        sources = self._sources(exclude)
        m = self.terms.shape[1]
        if not sources:
            return np.full((m, len(PRIOR_FEATURES)), 0.5)
        every = self.regret(preference)
        regret = every[sources]
        nearest = sources[int(np.argmin(self.distances(descriptor, sources)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(regret, axis=0)
        transfer = np.nan_to_num(self.transfer_regret(descriptor, preference, exclude), nan=1.0)
        rank = np.empty(m)
        rank[np.argsort(transfer, kind="stable")] = np.arange(m) / max(m - 1, 1)
        out = np.stack([transfer, rank, every[nearest], mean], axis=1)
        return np.nan_to_num(out, nan=1.0)

    def save(self, path: Path) -> None:
        """Write the descriptors and terms as safetensors (names go on the policy card)."""
        import torch
        from safetensors.torch import save_file

        tensors = {
            "descriptors": torch.as_tensor(self.descriptors, dtype=torch.float64),
            "terms": torch.as_tensor(self.terms, dtype=torch.float64),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: Path, names: list[str], masks: int, width: int | None = None) -> TransferPrior:
        """Read a prior written by :meth:`save` for ``names`` over ``masks`` masks (descriptors of
        ``width`` entries), checking shapes and values: NaN, infinity and magnitudes no table
        holds (above :data:`MAX_PRIOR_VALUE`) are refused."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not path.is_file():
            raise PolicyError(f"{path}: no such file; a search policy ships its prior beside its weights")
        try:
            tensors = load_file(str(path))
            descriptors, terms = tensors["descriptors"], tensors["terms"]
        except (SafetensorError, KeyError, OSError, ValueError) as exc:
            raise PolicyError(f"{path}: not a memrl prior ({str(exc)[:120]}); retrain the policy") from None
        checked = width is not None and len(names) > 0  # an empty prior has no descriptor columns
        wide = descriptors.ndim != 2 or (checked and descriptors.shape[1] != width)
        if terms.shape != (len(names), masks, 3) or descriptors.shape[0] != len(names) or wide:
            raise PolicyError(
                f"{path}: shapes {descriptors.shape} and {terms.shape} do not fit the card's "
                f"{len(names)} training tasks, {masks} masks and descriptors of {width} entries; use the "
                "prior written with the policy"
            )
        for name, values in (("descriptors", descriptors), ("terms", terms)):
            finite = np.isfinite(values[~np.isnan(values)]) if name == "terms" else np.isfinite(values)
            if not finite.all() or (np.abs(np.nan_to_num(values)) > MAX_PRIOR_VALUE).any():
                raise PolicyError(
                    f"{path}: its {name} hold infinite, NaN or huge values (above {MAX_PRIOR_VALUE:g}); "
                    "a prior written by memrl holds none: use the prior written with the policy"
                )
        return cls(list(names), descriptors.astype(float), terms.astype(float))


def agreement_weights(
    regret: np.ndarray, weights: np.ndarray, observed: list[int], values: np.ndarray
) -> np.ndarray:
    """(S,) the sources' ``weights`` times exp(-:data:`AGREEMENT_SHARPNESS` x the share of pairs of
    ``observed`` masks whose ``values`` (the searched task's rewards) the source's ``regret``
    (S, M) orders the other way: after RGPE's ranking loss (Feurer et al. 2018), a descriptor
    neighbour whose ranking the task contradicts stops steering the search."""
    values = np.asarray(values, dtype=float)
    upper = np.triu(np.ones((len(observed), len(observed)), dtype=bool), 1)
    task_order = np.sign(values[:, None] - values[None, :])
    pairs = upper & (task_order != 0)
    source = -regret[:, observed]  # (S, n) the sources' rewards on the observed masks, up to scale
    with np.errstate(invalid="ignore"):
        discordant = (np.sign(source[:, :, None] - source[:, None, :]) * task_order < 0) & pairs
    share = discordant.sum(axis=(1, 2)) / max(int(pairs.sum()), 1)
    return np.asarray(weights, dtype=float) * np.exp(-AGREEMENT_SHARPNESS * share)


def agreement_regret(
    regret: np.ndarray, weights: np.ndarray, observed: list[int], values: np.ndarray
) -> np.ndarray:
    """(M,) the sources' ``regret`` (S, M) averaged with :func:`agreement_weights`: the transfer
    prior re-weighted by the results so far. With nothing observed it is the plain weighted
    average (:meth:`TransferPrior.transfer_regret`)."""
    w = agreement_weights(regret, weights, observed, values)
    return (w[:, None] * regret).sum(axis=0) / w.sum()


def portfolio_regret(
    regret: np.ndarray, weights: np.ndarray, tried: list[int], observed: list[int], values: np.ndarray
) -> np.ndarray:
    """(M,) for every mask, the sources' best regret among ``tried`` and that mask, averaged with
    :func:`agreement_weights` (``observed``, ``values``: the results so far, references included):
    the mask that best completes the tried ones as a portfolio for tasks like the sources, as the
    greedy portfolio baseline picks, but weighted for this task. A missing regret counts as 1."""
    regret = np.nan_to_num(regret, nan=1.0)
    w = agreement_weights(regret, weights, observed, values)
    best = regret[:, tried].min(axis=1, keepdims=True) if tried else np.ones((len(regret), 1))
    return (w[:, None] * np.minimum(best, regret)).sum(axis=0) / w.sum()
