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

log = logging.getLogger(__name__)

METHODS = ("random", "optuna-tpe", "optuna-nsga2", "optuna-gp", "exhaustive", "fixed")
PEFT_PRESETS = ("attention", "bias_norm", "difffit", "lora", "svdiff")


class SearchRunner:
    """Evaluates masks for one task of one config and keeps the rows."""

    def __init__(self, cfg: Config, task: int | dict[str, Any] | str = 0) -> None:
        self.cfg, self.task = cfg, task
        self.rows: list[dict[str, Any]] = []
        self._envs: dict[str, Any] = {}

    def env(self, method: str | None = None):
        from memrl.envs.memcontrol import MemControlEnv

        method = method or self.cfg.search.method
        if method not in self._envs:
            self._envs[method] = MemControlEnv(load_config(self.cfg, {"search.method": method}))
        return self._envs[method]

    @property
    def k(self) -> int:
        return self.env().k

    def evaluate(self, mask, method: str | None = None, label: str = "") -> dict[str, Any]:
        env = self.env(method)
        env.reset(seed=self.cfg.seed, options={"dataset": self.task})
        reward, info = env.evaluate_mask(np.asarray(mask, dtype=np.int8))
        row = {
            "label": label or "".join(map(str, mask)),
            "mask": [int(m) for m in mask],
            "method": method or self.cfg.search.method,
            "reward": reward,
            "ok": info["ok"],
            "cache_hit": info["cache_hit"],
            "memorization_term": info.get("memorization_term", float("nan")),
            "quality_term": info.get("quality_term", float("nan")),
            "seconds": info["timings"].get("total", 0.0) if not info["cache_hit"] else 0.0,
            "metrics": info["metrics"],
        }
        self.rows.append(row)
        return row


def _random(runner: SearchRunner, budget: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    limit = 2**runner.k
    for _ in tqdm(range(min(budget, limit)), desc="random search"):
        while True:
            mask = tuple(int(v) for v in rng.integers(0, 2, runner.k))
            if mask not in seen:
                break
        seen.add(mask)
        runner.evaluate(mask)


def _exhaustive(runner: SearchRunner, budget: int, seed: int) -> None:
    total = 2**runner.k
    if total > budget:
        raise ValueError(f"exhaustive search needs {total} evaluations (K={runner.k}); raise --budget")
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

    def objective(trial):
        mask = [trial.suggest_int(f"g{i}", 0, 1) for i in range(k)]
        row = runner.evaluate(mask)
        if sampler_name == "nsga2":
            return row["memorization_term"], row["quality_term"]
        return row["reward"]

    study.optimize(objective, n_trials=budget, show_progress_bar=True)


def run_search(cfg: Config, method: str, budget: int, seed: int = 0, task=0) -> list[dict[str, Any]]:
    """Run baseline ``method`` with ``budget`` evaluations; returns the result rows."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if budget <= 0:
        raise ValueError(f"budget={budget} must be positive")
    runner = SearchRunner(cfg, task)
    if method == "random":
        _random(runner, budget, seed)
    elif method == "exhaustive":
        _exhaustive(runner, budget, seed)
    elif method == "fixed":
        _fixed(runner, budget, seed)
    else:
        _optuna(runner, budget, seed, method.split("-")[1])
    return runner.rows
