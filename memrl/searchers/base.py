"""The searcher protocol (after optuna's samplers): a searcher *asks* for the next trial given the
history so far and is *told* each result; an oracle evaluates trials. :func:`run` drives one
against the other for a budget of distinct fine-tunes.

A repeated trial is a stored evaluation (free, live or on a table): it is told again with the
earlier result and does not count against the budget, as ``optuna`` methods and the benchmark
have always counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from memrl.prior import TransferPrior

__all__ = ["History", "Knowledge", "Oracle", "Result", "Searcher", "Trial", "run", "mask_key"]

MAX_ASKS_PER_FINE_TUNE = 4
"""A search stops after this many asks per fine-tune of budget (a sampler repeating itself)."""


@dataclass(frozen=True)
class Trial:
    """What a searcher asks to evaluate: a mask of groups to fine-tune, and optionally a PEFT
    method other than the config's (the ``fixed`` presets; a table holds one method only)."""

    mask: np.ndarray
    peft: str | None = None
    label: str = ""

    @property
    def key(self) -> tuple[Any, ...]:
        return (*mask_key(self.mask), self.peft)


def mask_key(mask: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in mask)


@dataclass(frozen=True)
class Result:
    """One evaluated trial: the reward at the search's preference (``-inf`` when it failed), the
    normalised memorization and quality terms, and what the evaluation recorded."""

    reward: float
    memorization: float
    quality: float
    ok: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cache_hit: bool = False


@dataclass
class History:
    """The distinct trials evaluated so far, in order, and their results. ``references``: the
    rewards of no fine-tune and of the mask of ones (NaN where unknown), which every search
    observes first; ``pending``: trials asked in the current batch, not yet told."""

    references: tuple[float, float] | None = None
    trials: list[Trial] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    pending: list[Trial] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trials)

    @property
    def masks(self) -> list[np.ndarray]:
        return [t.mask for t in self.trials]

    def tried(self) -> set[tuple[Any, ...]]:
        """Keys of every trial evaluated or pending."""
        return {t.key for t in self.trials} | {t.key for t in self.pending}

    def result_of(self, trial: Trial) -> Result | None:
        for done, result in zip(self.trials, self.results):
            if done.key == trial.key:
                return result
        return None

    def best_index(self) -> int | None:
        """The trial with the best finite reward, or None."""
        rewards = [r.reward for r in self.results]
        if not rewards or not np.isfinite(max(rewards)):
            return None
        return int(np.argmax(rewards))

    @property
    def baseline(self) -> float:
        """The better reference's reward (0 when unknown)."""
        known = [r for r in self.references or () if np.isfinite(r)]
        return max(known) if known else 0.0


@dataclass
class Knowledge:
    """What a searcher may know besides its results: the space, the preference (memorization,
    quality, parameter weights), its seed, the dataset's descriptor, the training tasks' tables
    (a :class:`~memrl.prior.TransferPrior`), a trained policy, which masks the oracle can answer,
    and models fitted once for many searches (``fitted``, by searcher name)."""

    k: int
    preference: np.ndarray
    seed: int = 0
    budget: int = 1
    group_names: list[str] | None = None
    descriptor: np.ndarray | None = None
    prior: TransferPrior | None = None
    policy: Any = None
    available: np.ndarray | None = None
    """Indices (binary counting order) of the masks the oracle holds; None: every mask."""
    fitted: dict[str, Any] = field(default_factory=dict)

    @property
    def memorization_weight(self) -> float:
        return float(self.preference[0])


class Searcher(Protocol):
    """Proposes trials one at a time. ``ask`` returns None when it has nothing more to propose."""

    def ask(self, history: History) -> Trial | None: ...

    def tell(self, trial: Trial, result: Result) -> None: ...


class Oracle(Protocol):
    """Evaluates trials: live or replayed fine-tunes (:class:`~memrl.searchers.TaskOracle`) or a
    table row (:class:`~memrl.searchers.TableOracle`)."""

    def evaluate(self, trial: Trial) -> Result: ...

    def references(self) -> tuple[float, float]: ...

    def prefetch(self, trials: list[Trial]) -> None: ...


def run(
    searcher: Searcher,
    oracle: Oracle,
    budget: int,
    batch: int = 1,
    on_result: Callable[[History], None] | None = None,
) -> History:
    """Ask ``searcher`` for trials and evaluate them on ``oracle`` until ``budget`` distinct
    trials are done, the searcher has nothing left, or it has asked
    :data:`MAX_ASKS_PER_FINE_TUNE` times per fine-tune of budget. ``batch`` trials are asked before
    any is told, and evaluated at once (concurrently on the Ray backend). ``on_result`` is called
    after each new result (progress, traces)."""
    history = History(references=oracle.references())
    asks = 0
    while len(history) < budget and asks < MAX_ASKS_PER_FINE_TUNE * budget:
        asked: list[Trial] = []
        while len(asked) < min(batch, budget - len(history)) and asks < MAX_ASKS_PER_FINE_TUNE * budget:
            trial = searcher.ask(history)
            if trial is None:
                break
            asks += 1
            asked.append(trial)
            history.pending.append(trial)
        if not asked:
            break
        new = [t for t in dict((t.key, t) for t in asked).values() if history.result_of(t) is None]
        if len(new) > 1:
            oracle.prefetch(new)
        history.pending.clear()
        for trial in asked:
            result = history.result_of(trial)
            if result is None:
                if len(history) >= budget:
                    break
                result = oracle.evaluate(trial)
                history.trials.append(trial)
                history.results.append(result)
                if on_result is not None:
                    on_result(history)
            searcher.tell(trial, result)
    return history
