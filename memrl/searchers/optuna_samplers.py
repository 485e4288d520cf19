"""Optuna's samplers as searchers (MemControl's reference search is Optuna's): TPE and GP maximise
the scalar reward; NSGA-II minimises the memorization and quality terms (a Pareto front)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from memrl.errors import ConfigError
from memrl.searchers.base import History, Knowledge, Result, Trial

__all__ = ["FAILED_REWARD", "FAILED_TERMS", "OptunaSearcher", "SAMPLERS"]

SAMPLERS = ("tpe", "gp", "nsga2")
FAILED_REWARD = -2.0
"""What a failed or missing trial tells a single-objective sampler."""
FAILED_TERMS = (2.0, 2.0)
"""What a failed or missing trial tells NSGA-II (both terms far worse than any real one)."""


class OptunaSearcher:
    """One Optuna study asked and told through its ask/tell interface, one integer parameter per
    group. ``warm``: masks enqueued as the first trials (a warm start from what transfers)."""

    def __init__(self, sampler: str, knowledge: Knowledge, warm: list[np.ndarray] | None = None) -> None:
        try:
            import optuna
        except ImportError as err:
            raise ConfigError("Optuna searchers need optuna: pip install 'memrl[optuna]'") from err
        if sampler not in SAMPLERS:
            raise ConfigError(f"Optuna sampler {sampler!r} is not one of {SAMPLERS}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sampler, self.k = sampler, knowledge.k
        seed, budget = knowledge.seed, knowledge.budget
        if sampler == "nsga2":
            chosen: Any = optuna.samplers.NSGAIISampler(
                seed=seed, population_size=max(4, min(16, budget // 2))
            )
            self.study = optuna.create_study(directions=["minimize", "minimize"], sampler=chosen)
        else:
            cls = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.GPSampler
            startup = min(5, budget)
            self.study = optuna.create_study(
                direction="maximize", sampler=cls(seed=seed, n_startup_trials=startup)
            )
        for mask in warm or []:
            self.study.enqueue_trial({f"g{j}": int(v) for j, v in enumerate(mask)})
        self._asked: deque[Any] = deque()

    def ask(self, history: History) -> Trial | None:
        trial = self.study.ask()
        self._asked.append(trial)
        return Trial(np.array([trial.suggest_int(f"g{j}", 0, 1) for j in range(self.k)], dtype=np.int8))

    def tell(self, trial: Trial, result: Result) -> None:
        asked = self._asked.popleft()
        if self.sampler == "nsga2":
            ok = result.ok and np.isfinite(result.memorization)
            self.study.tell(asked, [result.memorization, result.quality] if ok else list(FAILED_TERMS))
        else:
            self.study.tell(asked, result.reward if np.isfinite(result.reward) else FAILED_REWARD)
