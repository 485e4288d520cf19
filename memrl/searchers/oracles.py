"""The oracles: a :class:`~memrl.task.Task` (live fine-tunes, or replay of stored ones), the same
task searched over (mask, length) with checkpointed fine-tunes, and a row of a suite's tables (no
fine-tune at all)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memrl.errors import ConfigError
from memrl.reward import Reward, RewardConfig
from memrl.searchers.base import Result, Trial
from memrl.spec import with_derived_metrics
from memrl.table import BenchTable, mask_index
from memrl.task import Task

__all__ = ["CurveOracle", "TableOracle", "TaskOracle"]


class TaskOracle:
    """Evaluates trials on a task: each one a fine-tune (or a stored evaluation, free), scored
    with ``reward`` (default the task's config's). A trial naming a PEFT method runs on a copy of
    the task with ``search.method`` set to it. ``workers`` > 1: batches are evaluated at once
    (concurrently with ``env.backend=ray``)."""

    def __init__(self, task: Any, reward: RewardConfig | None = None, workers: int = 1) -> None:
        self.task, self.reward, self.workers = task, reward or task.cfg.reward, workers
        self._tasks: dict[str | None, Any] = {None: task}

    @property
    def k(self) -> int:
        return int(self.task.space.k)

    def _task_for(self, peft: str | None) -> Any:
        if peft not in self._tasks:
            cfg = self.task.cfg.with_changes({"search.method": peft})
            self._tasks[peft] = Task(cfg, self.task.evaluator, self.task.name, self.task.heldout)
        return self._tasks[peft]

    def evaluate(self, trial: Trial) -> Result:
        outcome = self._task_for(trial.peft).score(np.asarray(trial.mask, dtype=np.int8), self.reward)
        ev = outcome.evaluation
        return Result(
            reward=float(outcome.reward) if outcome.ok else float("-inf"),
            memorization=float(outcome.terms.get("memorization_term", float("nan"))),
            quality=float(outcome.terms.get("quality_term", float("nan"))),
            ok=bool(outcome.ok),
            metrics=dict(ev.metrics),
            seconds=0.0 if ev.cache_hit else float(ev.timings.get("total", 0.0)),
            cache_hit=bool(ev.cache_hit),
        )

    def references(self) -> tuple[float, float]:
        none, ones = self.task.reference_rewards(self.reward)
        return float(none), float(ones)

    def prefetch(self, trials: list[Trial]) -> None:
        if self.workers <= 1:
            return
        for peft in dict.fromkeys(t.peft for t in trials):
            masks = [np.asarray(t.mask, dtype=np.int8) for t in trials if t.peft == peft]
            self._task_for(peft).prefetch(masks)


class CurveOracle(TaskOracle):
    """Searches (mask, length): each trial is one fine-tune of ``steps`` steps measured every
    ``every`` steps, scored at its best checkpoint on the task's plain references (the loss-based
    reward is measured at every checkpoint); :attr:`best_steps` records that checkpoint per mask."""

    def __init__(self, task: Any, every: int, steps: int, reward: RewardConfig | None = None) -> None:
        super().__init__(task, reward)
        changes = {"finetune.checkpoint_every": every, "finetune.steps": steps}
        self.curves = Task(task.cfg.with_changes(changes), task.evaluator, task.name, task.heldout)
        self.best_steps: dict[tuple[int, ...], int] = {}

    def evaluate(self, trial: Trial) -> Result:
        if trial.peft is not None:
            raise ConfigError(
                f"trial {trial.label or trial.peft!r}: a curve search fine-tunes masks of groups"
            )
        mask = self.curves.space.validate(np.asarray(trial.mask, dtype=np.int8))
        ev = self.curves.evaluate(mask)
        seconds = 0.0 if ev.cache_hit else float(ev.timings.get("total", 0.0))
        if not ev.ok or not ev.curve:
            return Result(
                float("-inf"), float("nan"), float("nan"), False, dict(ev.metrics), seconds, ev.cache_hit
            )
        score = Reward(self.reward, self.task.references())
        points = [with_derived_metrics(point) for point in ev.curve]
        best = max(points, key=score)  # the first of equal rewards: the shorter fine-tune
        terms = score.terms(best)
        self.best_steps[tuple(int(v) for v in mask)] = int(best["step"])
        return Result(
            score(best),
            terms["memorization_term"],
            terms["quality_term"],
            True,
            dict(best),
            seconds,
            ev.cache_hit,
        )

    def prefetch(self, trials: list[Trial]) -> None:
        """Nothing ahead: each curve is one fine-tune, run when asked."""


class TableOracle:
    """Reads trials off task ``test`` of a suite's tables at memorization weight ``w`` (quality
    weight 1 - w); a mask the table lacks is a failed trial."""

    def __init__(self, table: BenchTable, test: int, w: float) -> None:
        self.table, self.test, self.w = table, test, w
        self.rewards = table.rewards(w)[test]
        self.terms = table.terms[test]

    @property
    def k(self) -> int:
        return int(self.table.masks.shape[1])

    def available(self) -> np.ndarray:
        """Indices of the masks this task's table holds."""
        return np.flatnonzero(np.isfinite(self.terms[:, 0]))

    def evaluate(self, trial: Trial) -> Result:
        if trial.peft is not None:
            raise ConfigError(
                f"trial {trial.label or trial.peft!r} asks for PEFT method {trial.peft!r}; a table holds "
                "one method's fine-tunes: search it live (python -m memrl.search)"
            )
        i = mask_index(trial.mask)
        reward = float(self.rewards[i])
        ok = bool(np.isfinite(reward))
        return Result(
            reward if ok else float("-inf"),
            float(self.terms[i, 0]),
            float(self.terms[i, 1]),
            ok,
            cache_hit=True,
        )

    def references(self) -> tuple[float, float]:
        return float(self.rewards[0]), float(self.rewards[-1])

    def prefetch(self, trials: list[Trial]) -> None:
        """Nothing to do: every row is stored."""
