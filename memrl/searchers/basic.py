"""Searchers that need no training tasks: random, exhaustive, fixed presets, and a fixed list."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from memrl.errors import ConfigError
from memrl.searchers.base import History, Knowledge, Result, Trial

__all__ = ["ListSearcher", "PEFT_PRESETS", "exhaustive", "fixed_presets", "hand_presets", "random_masks"]

PEFT_PRESETS = ("attention", "bias_norm", "difffit", "lora", "svdiff")
"""The PEFT methods the ``fixed`` presets run on all groups (live only)."""
MAX_PERMUTED_GROUPS = 16
"""Up to this many groups random search permutes every mask; above, it draws masks bit by bit."""


class ListSearcher:
    """Asks the trials of an iterable in order, skipping ones already tried, and ignores results
    (zero-shot methods: their list is fixed before any fine-tune)."""

    def __init__(self, trials: Iterable[Trial]) -> None:
        self._trials: Iterator[Trial] = iter(trials)

    def ask(self, history: History) -> Trial | None:
        tried = history.tried()
        for trial in self._trials:
            if trial.key not in tried:
                return trial
        return None

    def tell(self, trial: Trial, result: Result) -> None:
        """Results do not change the list."""


def index_mask(index: int, k: int) -> np.ndarray:
    """Mask number ``index`` in binary counting order."""
    return np.array([(index >> (k - 1 - j)) & 1 for j in range(k)], dtype=np.int8)


def trials_of(indices: Iterable[int], k: int) -> list[Trial]:
    return [Trial(index_mask(int(i), k)) for i in indices]


def random_masks(knowledge: Knowledge) -> ListSearcher:
    """Distinct uniformly random masks: a random order of the oracle's masks (every mask up to
    :data:`MAX_PERMUTED_GROUPS` groups), else masks drawn bit by bit, repeats skipped."""
    rng, k = np.random.default_rng(knowledge.seed), knowledge.k
    if knowledge.available is not None:
        return ListSearcher(trials_of(rng.permutation(knowledge.available), k))
    if k <= MAX_PERMUTED_GROUPS:
        return ListSearcher(trials_of(rng.permutation(2**k), k))

    def draws() -> Iterator[Trial]:
        while True:
            yield Trial(rng.integers(0, 2, k).astype(np.int8))

    return ListSearcher(draws())


def exhaustive(knowledge: Knowledge) -> ListSearcher:
    """Every mask in counting order; refuses a budget smaller than the space."""
    total = 2**knowledge.k
    if total > knowledge.budget:
        raise ConfigError(f"exhaustive search needs {total} evaluations (K={knowledge.k}); raise --budget")
    masks = itertools.product((0, 1), repeat=knowledge.k)
    return ListSearcher(Trial(np.array(m, dtype=np.int8)) for m in masks)


def hand_presets(names: list[str]) -> dict[str, np.ndarray]:
    """The hand-picked masks: attention of the down blocks, the mid block, the up blocks, and all
    attention (the mask of ones)."""
    out = {}
    for family in ("down_blocks", "mid_block", "up_blocks"):
        mask = np.array([int(n.split(".")[0] == family) for n in names], dtype=np.int8)
        if 0 < mask.sum() < len(names):
            out[f"{family.replace('_', '-')} attention"] = mask
    out["all attention"] = np.ones(len(names), dtype=np.int8)
    return out


def fixed_presets(knowledge: Knowledge) -> ListSearcher:
    """No fine-tune, full fine-tuning, then each PEFT method of :data:`PEFT_PRESETS` on all groups
    (the presets differ in method, not mask: live only)."""
    k = knowledge.k
    zeros, ones = np.zeros(k, dtype=np.int8), np.ones(k, dtype=np.int8)
    trials = [Trial(zeros, "full", "no fine-tune"), Trial(ones, "full", "full")]
    trials += [Trial(ones, m, f"{m} (all groups)") for m in PEFT_PRESETS]
    return ListSearcher(trials)


def hand_picked(knowledge: Knowledge) -> ListSearcher:
    """:func:`hand_presets` in order (needs the groups' names)."""
    if knowledge.group_names is None:
        raise ConfigError("the presets searcher needs the search space's group names")
    presets = hand_presets(knowledge.group_names)
    return ListSearcher(Trial(mask, None, label) for label, mask in presets.items())
