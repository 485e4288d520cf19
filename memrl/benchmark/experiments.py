"""The benchmark's experiments, each a list of rows: zero-shot transfer, mask against sequential
mode, and searching one task from scratch; run fold by fold in single-threaded processes."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from memrl.benchmark.methods import (
    optuna_search,
    policy_masks,
    ppo_search,
    presets,
    random_search,
    regression,
    single_best,
    train_policies,
)
from memrl.benchmark.table import BUDGETS, PREFERENCES, BenchTable, best_regret, folds, load_table, mask_index
from memrl.config import Config

log = logging.getLogger("memrl.benchmark")


def search_curves(
    cfg: Config, seeds: int, budget: int = 64, ppo_steps: int = 4000, workers: int = 1
) -> list[dict[str, Any]]:
    """Best-so-far regret against distinct fine-tunes (1..budget) when searching one task from
    scratch: PPO, random, TPE, NSGA-II and GP; one row per method, task, preference, seed and n."""
    table = load_table(cfg)
    complete = table.complete()
    work = [
        (cfg, table, seed, test, w, budget, ppo_steps)
        for seed, test, w in itertools.product(range(seeds), complete, PREFERENCES)
    ]
    return [row for rows in in_parallel(search_one, work, workers) for row in rows]


def search_one(
    cfg: Config, table: BenchTable, seed: int, test: int, w: float, budget: int, ppo_steps: int
) -> list[dict[str, Any]]:
    regret = table.regret(w)[test]
    tried = {
        "ppo": ppo_search(cfg, table.names[test], w, seed, budget, ppo_steps),
        "random": random_search(table, test, budget, np.random.default_rng(seed)),
        **{name: optuna_search(table, test, w, budget, seed, name) for name in ("tpe", "nsga2", "gp")},
    }
    rows = []
    for method, masks in tried.items():
        distinct = list(dict.fromkeys(masks))
        for n in range(1, budget + 1):
            rows.append(
                {
                    "method": method,
                    "task": table.names[test],
                    "memorization_weight": w,
                    "seed": seed,
                    "fine_tunes": n,
                    "regret": best_regret(regret, distinct[:n]),
                }
            )
    log.info("search: seed %d, task %s, w %.2f done", seed, table.names[test], w)
    return rows


def modes(
    cfg: Config, seeds: int, episodes: tuple[int, ...] = (1000, 4000, 10000), workers: int = 1
) -> list[dict[str, Any]]:
    """Mask mode against sequential mode: zero-shot regret of each one's first proposal on every
    fold, after the same numbers of training episodes (= masks evaluated)."""
    table = load_table(cfg)
    work = [
        (cfg, table, seed, test, train, episodes) for seed in range(seeds) for test, train in folds(table)
    ]
    return [row for rows in in_parallel(modes_fold, work, workers) for row in rows]


def modes_fold(
    cfg: Config, table: BenchTable, seed: int, test: int, train: list[int], episodes: tuple[int, ...]
) -> list[dict[str, Any]]:
    names = [table.names[u] for u in train]
    rows = []
    for mode in ("mask", "sequential"):
        policies = train_policies(cfg, names, seed, list(episodes), mode=mode)
        for n, policy in zip(sorted(episodes), policies):
            for w in PREFERENCES:
                rows.append(
                    {
                        "method": f"ppo-{mode}",
                        "task": table.names[test],
                        "heldout": bool(table.heldout[test]),
                        "memorization_weight": w,
                        "seed": seed,
                        "episodes": n,
                        "regret": best_regret(table.regret(w)[test], policy_masks(policy, table, test, w, 1)),
                    }
                )
    log.info("modes: seed %d, test task %s done", seed, table.names[test])
    return rows


def transfer(
    cfg: Config, seeds: int, episodes: int, budgets: tuple[int, ...] = BUDGETS, workers: int = 1
) -> list[dict[str, Any]]:
    """Regret of every method on every test task, preference and seed (one row each)."""
    table = load_table(cfg)
    work = [
        (cfg, table, seed, test, train, episodes, budgets)
        for seed in range(seeds)
        for test, train in folds(table)
    ]
    return [row for rows in in_parallel(transfer_fold, work, workers) for row in rows]


def transfer_fold(
    cfg: Config,
    table: BenchTable,
    seed: int,
    test: int,
    train: list[int],
    episodes: int,
    budgets: tuple[int, ...],
) -> list[dict[str, Any]]:
    """Every method's rows for one test task and seed (PPO trained on ``train``)."""
    from memrl.task import architecture_space

    names = [table.names[u] for u in train]
    nets = {zero: train_policies(cfg, names, seed, [episodes], zero)[0] for zero in (False, True)}
    group_names = architecture_space(cfg).names
    rows = []
    for w in PREFERENCES:
        regret = table.regret(w)[test]
        rng = np.random.default_rng(seed)
        tried: dict[str, list[int]] = {"ppo": policy_masks(nets[False], table, test, w, 1)}
        for n in (2, 3, 4):
            tried[f"ppo-top{n}"] = policy_masks(nets[False], table, test, w, n)
        tried["ppo-no-descriptor"] = policy_masks(nets[True], table, test, w, 1, zero=True)
        tried["single-best"] = [single_best(table, train, w)]
        for label, mask in presets(group_names).items():
            tried[f"preset: {label}"] = [mask_index(mask)]
        tried["regression"] = [regression(table, train, test, w, seed)]
        for n in budgets:
            tried[f"random-{n}"] = random_search(table, test, n, rng)
            tried[f"tpe-{n}"] = optuna_search(table, test, w, n, seed, "tpe")
        for method, masks in tried.items():
            rows.append(
                {
                    "method": method,
                    "task": table.names[test],
                    "heldout": bool(table.heldout[test]),
                    "memorization_weight": w,
                    "seed": seed,
                    "fine_tunes": len(masks),
                    "regret": best_regret(regret, masks),
                    "mask": "".join(map(str, table.masks[masks[0]])),
                }
            )
    log.info("transfer: seed %d, test task %s done", seed, table.names[test])
    return rows


def in_parallel(fn: Callable[..., Any], work: list[tuple[Any, ...]], workers: int) -> list[Any]:
    """``[fn(*args) for args in work]``, in ``workers`` single-threaded processes when above 1."""
    if workers <= 1:
        return [fn(*args) for args in work]
    import multiprocessing as mp
    import os

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
    with mp.get_context("spawn").Pool(workers, initializer=_single_threaded) as pool:
        return pool.starmap(fn, work, chunksize=1)


def _single_threaded() -> None:
    import torch

    from memrl.utils import setup_logging

    torch.set_num_threads(1)
    setup_logging()
