"""Search baselines on the same environment, evaluator and store as PPO.

* ``random``: distinct uniformly random masks.
* ``optuna-tpe`` / ``optuna-gp``: Optuna maximising the scalar reward (MemControl's reference
  searches its mask with Optuna); ``optuna-nsga2``: multi-objective, minimising the normalised
  memorization and quality terms (a Pareto front, as the paper reports).
* ``exhaustive``: every mask (small K only).
* ``fixed``: presets: no fine-tune, full, and each PEFT method on all groups.

Each returns a list of result rows (mask, method, reward, terms, metrics); the evaluations land
in the store, so a repeated mask costs nothing and PPO and baselines share them.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from memrl.config import Config, load_config
from memrl.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("random", "optuna-tpe", "optuna-nsga2", "optuna-gp", "exhaustive", "fixed")
PEFT_PRESETS = ("attention", "bias_norm", "difffit", "lora", "svdiff")


class SearchRunner:
    """Evaluates masks on one task of one config (through :class:`memrl.task.Task`) and keeps the rows."""

    def __init__(self, cfg: Config, task: int | str | dict[str, Any] = 0, workers: int = 1) -> None:
        from memrl.task import make_evaluator, resolve_task

        if workers < 1:
            raise ConfigError(f"--workers {workers} must be at least 1")
        self.cfg, self.workers = cfg, workers
        self.task_cfg = resolve_task(cfg, task)
        self.evaluator = make_evaluator(cfg)
        self.rows: list[dict[str, Any]] = []
        self._tasks: dict[str, Any] = {}

    def task(self, method: str | None = None):
        from memrl.task import Task

        method = method or self.cfg.search.method
        if method not in self._tasks:
            self._tasks[method] = Task(load_config(self.task_cfg, {"search.method": method}), self.evaluator)
        return self._tasks[method]

    @property
    def k(self) -> int:
        return self.task().space.k

    def evaluate(self, mask, method: str | None = None, label: str = "") -> dict[str, Any]:
        outcome = self.task(method).score(np.asarray(mask, dtype=np.int8))
        ev = outcome.evaluation
        row = {
            "label": label or "".join(map(str, mask)),
            "mask": [int(m) for m in mask],
            "method": method or self.cfg.search.method,
            "reward": outcome.reward,
            "ok": outcome.ok,
            "cache_hit": ev.cache_hit,
            "memorization_term": outcome.terms.get("memorization_term", float("nan")),
            "quality_term": outcome.terms.get("quality_term", float("nan")),
            "seconds": 0.0 if ev.cache_hit else ev.timings.get("total", 0.0),
            "metrics": ev.metrics,
        }
        self.rows.append(row)
        return row

    def prefetch(self, masks: list[Any], method: str | None = None) -> None:
        """Evaluate ``masks`` at once (concurrently with ``env.backend=ray``) before scoring them."""
        if self.workers > 1:
            self.task(method).prefetch([np.asarray(m, dtype=np.int8) for m in masks])


def _random(runner: SearchRunner, budget: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    masks = []
    for _ in range(min(budget, 2**runner.k)):
        while True:
            mask = tuple(int(v) for v in rng.integers(0, 2, runner.k))
            if mask not in seen:
                break
        seen.add(mask)
        masks.append(mask)
    with tqdm(total=len(masks), desc="random search") as bar:
        for start in range(0, len(masks), runner.workers):
            batch = masks[start : start + runner.workers]
            runner.prefetch(batch)
            for mask in batch:
                runner.evaluate(mask)
                bar.update()


def _exhaustive(runner: SearchRunner, budget: int, seed: int) -> None:
    total = 2**runner.k
    if total > budget:
        raise ConfigError(f"exhaustive search needs {total} evaluations (K={runner.k}); raise --budget")
    for mask in tqdm(list(itertools.product((0, 1), repeat=runner.k)), desc="exhaustive"):
        runner.evaluate(mask)


def _fixed(runner: SearchRunner, budget: int, seed: int) -> None:
    k = runner.k
    presets = [("no fine-tune", "full", [0] * k), ("full", "full", [1] * k)]
    presets += [(f"{m} (all groups)", m, [1] * k) for m in PEFT_PRESETS]
    for label, method, mask in tqdm(presets[:budget], desc="fixed presets"):
        runner.evaluate(mask, method, label)


def _optuna(runner: SearchRunner, budget: int, seed: int, sampler_name: str) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    k = runner.k
    sampler: optuna.samplers.BaseSampler
    if sampler_name == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(16, budget // 2)))
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    else:
        sampler = (
            optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, budget))
            if sampler_name == "tpe"
            else optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(5, budget))
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)

    with tqdm(total=budget, desc=f"optuna {sampler_name}") as bar:
        for start in range(0, budget, runner.workers):  # ask a batch, evaluate it at once, tell
            trials = [study.ask() for _ in range(min(runner.workers, budget - start))]
            masks = [[t.suggest_int(f"g{i}", 0, 1) for i in range(k)] for t in trials]
            runner.prefetch(masks)
            for trial, mask in zip(trials, masks):
                row = runner.evaluate(mask)
                if sampler_name == "nsga2":
                    study.tell(trial, [row["memorization_term"], row["quality_term"]])
                else:
                    study.tell(trial, row["reward"])
                bar.update()


def run_search(
    cfg: Config, method: str, budget: int, seed: int = 0, task: Any = 0, workers: int = 1
) -> list[dict[str, Any]]:
    """Run baseline ``method`` with ``budget`` evaluations, ``workers`` at a time (concurrent with
    ``env.backend=ray``); returns the result rows."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {METHODS}")
    if budget <= 0:
        raise ConfigError(f"--budget {budget} must be positive")
    runner = SearchRunner(cfg, task, workers)
    if method == "random":
        _random(runner, budget, seed)
    elif method == "exhaustive":
        _exhaustive(runner, budget, seed)
    elif method == "fixed":
        _fixed(runner, budget, seed)
    else:
        _optuna(runner, budget, seed, method.split("-")[1])
    return runner.rows
