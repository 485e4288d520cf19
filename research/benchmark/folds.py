"""The folds and splits every method is judged on, over a suite's tables (:mod:`memrl.table`)."""

from __future__ import annotations

from typing import Any

from memrl.errors import MemrlError
from memrl.table import BenchTable, best_regret, load_table, mask_index

__all__ = [
    "BUDGETS",
    "PREFERENCES",
    "SPLITS",
    "BenchTable",
    "best_regret",
    "folds",
    "load_table",
    "mask_index",
    "source_folds",
    "split_folds",
    "split_of",
]

PREFERENCES = (0.25, 0.5, 0.75)
"""Memorization weights of the evaluation preferences (quality weight 1 minus it)."""
BUDGETS = (1, 2, 4, 8, 16)
"""Fine-tunes at which searches are judged (each budget a prefix of one search)."""


def folds(table: BenchTable) -> list[tuple[int, list[int]]]:
    """(test task, training tasks): leave-one-task-out over the complete training tasks, then each
    complete held-out task against all of them."""
    complete = table.complete()
    if len(complete) < 2:
        raise MemrlError(
            f"the tables hold {len(complete)} complete task(s) of {len(table.names)}; a transfer "
            "benchmark needs two or more: continue them with python -m memrl.tables build"
        )
    training = [t for t in complete if not table.heldout[t]]
    out = [(t, [u for u in training if u != t]) for t in training]
    out += [(t, training) for t in complete if table.heldout[t]]
    return [(test, train) for test, train in out if train]


def source_folds(table: BenchTable) -> list[tuple[int, list[int]]]:
    """(test task, training tasks): each complete training task against the training tasks of
    other sources only, which is how a held-out task of a new kind meets the tables (for a task
    that is its source's only one, the leave-one-task-out fold)."""
    sources = table.sources or table.names
    training = [t for t in table.complete() if not table.heldout[t]]
    out = [(t, [u for u in training if sources[u] != sources[t]]) for t in training]
    return [(test, train) for test, train in out if train]


SPLITS = ("leave one task out", "leave one source out", "held out")
"""The benchmark's splits: :func:`folds` gives the first and last, :func:`source_folds` the middle."""


def split_folds(table: BenchTable) -> list[tuple[int, list[int], str]]:
    """(test task, training tasks, split) of every split: :func:`folds` then :func:`source_folds`."""
    out = [(test, train, SPLITS[2] if table.heldout[test] else SPLITS[0]) for test, train in folds(table)]
    return out + [(test, train, SPLITS[1]) for test, train in source_folds(table)]


def split_of(row: dict[str, Any]) -> str:
    """A result row's split (rows written before the splits were named carry only ``heldout``)."""
    if row.get("split"):
        return str(row["split"])
    return SPLITS[2] if str(row.get("heldout")) == "True" else SPLITS[0]
