"""The benchmark's experiments, each a list of rows: zero-shot transfer, mask against sequential
mode, and searching one task from scratch; run fold by fold in single-threaded processes."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config
from memrl.errors import ConfigError
from memrl.searchers.basic import hand_presets
from memrl.searchers.transfer import regression_model
from memrl.utils import stable_hash
from research.benchmark.folds import (
    BUDGETS,
    PREFERENCES,
    BenchTable,
    best_regret,
    folds,
    load_table,
    mask_index,
    split_folds,
)
from research.benchmark.methods import (
    ONE_SHOT_PPO,
    policy_masks,
    ppo_search,
    prior_of,
    search_policy_masks,
    searched,
    train_policies,
)

__all__ = [
    "FROM_SCRATCH",
    "LEFT_OUT_SEPARATOR",
    "PART_FORMAT",
    "RESULTS_VERSION",
    "SEARCH_VARIANTS",
    "TUNE_BUDGETS",
    "TUNE_GRIDS",
    "ZERO_SHOT_TOP",
    "chosen_setting",
    "fold_key",
    "in_parallel",
    "leave_one_out",
    "modes",
    "modes_fold",
    "nested_rows",
    "nested_settings",
    "read_part",
    "sampler_seed",
    "search_curves",
    "search_one",
    "setting_of",
    "transfer",
    "transfer_fold",
    "tune",
    "tune_fold",
]

log = logging.getLogger("research.benchmark")


def search_curves(
    cfg: Config,
    seeds: int,
    budget: int = 64,
    ppo_steps: int = 4000,
    workers: int = 1,
    parts: Path | None = None,
) -> list[dict[str, Any]]:
    """Best-so-far regret against distinct fine-tunes (1..budget) when searching one task from
    scratch: PPO, random, TPE, NSGA-II and GP; one row per method, task, preference, seed and n.
    ``parts``: a folder where each finished (seed, task, preference) is kept, so a rerun resumes."""
    table = load_table(cfg)
    combos = list(itertools.product(range(seeds), table.complete(), PREFERENCES))
    work = [(cfg, table, seed, test, w, budget, ppo_steps) for seed, test, w in combos]
    keys = [fold_key(search_one, cfg, table, [test], seed, w, budget, ppo_steps) for seed, test, w in combos]
    return [row for rows in in_parallel(search_one, work, workers, keys, parts) for row in rows]


def sampler_seed(seed: int, table: BenchTable, test: int) -> int:
    """The seed of a from-scratch sampler on one task: the run's seed and the task's name, so that
    each task gets its own draws (seeded with the run's seed alone, every task of a seed would
    start from the same masks, and the tasks would not be independent samples of the method)."""
    return int(stable_hash([seed, table.names[test]], 8), 16)


FROM_SCRATCH = ("random", "tpe", "nsga2", "gp")
"""The searchers that search one task from scratch (beside PPO) in ``search``."""


def search_one(
    cfg: Config, table: BenchTable, seed: int, test: int, w: float, budget: int, ppo_steps: int
) -> list[dict[str, Any]]:
    regret = table.regret(w)[test]
    draws = sampler_seed(seed, table, test)
    tried = {
        "ppo": ppo_search(cfg, table.names[test], w, seed, budget, ppo_steps),
        **{
            name: searched(name, table, [], test, w, budget, draws)
            for name in ("random", "tpe", "nsga2", "gp")
        },
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
    cfg: Config,
    seeds: int,
    episodes: tuple[int, ...] = (1000, 4000, 10000),
    workers: int = 1,
    parts: Path | None = None,
) -> list[dict[str, Any]]:
    """Mask mode against sequential mode: zero-shot regret of each one's first proposal on every
    fold, after the same numbers of training episodes (= masks evaluated). ``parts``: as in
    :func:`search_curves`."""
    table = load_table(cfg)
    combos = [(seed, test, train) for seed in range(seeds) for test, train in folds(table)]
    work = [(cfg, table, seed, test, train, episodes) for seed, test, train in combos]
    keys = [fold_key(modes_fold, cfg, table, [test, *train], seed, episodes) for seed, test, train in combos]
    return [row for rows in in_parallel(modes_fold, work, workers, keys, parts) for row in rows]


def modes_fold(
    cfg: Config, table: BenchTable, seed: int, test: int, train: list[int], episodes: tuple[int, ...]
) -> list[dict[str, Any]]:
    names = [table.names[u] for u in train]
    rows = []
    for mode in ("mask", "sequential"):
        policies = train_policies(cfg.with_changes(ONE_SHOT_PPO), names, seed, list(episodes), mode=mode)
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
    cfg: Config,
    seeds: int,
    episodes: int,
    budgets: tuple[int, ...] = BUDGETS,
    workers: int = 1,
    parts: Path | None = None,
    search_episodes: int | None = None,
) -> list[dict[str, Any]]:
    """Regret of every method on every test task, preference, seed and number of fine-tunes (one
    row each), on each of :data:`~research.benchmark.folds.SPLITS` (a row's ``split``). Folds with the
    same training tasks are fitted once (the held-out tasks; the tasks of one source left out
    together; a task alone in its source, whose two training-task folds are one).
    ``search_episodes`` (not None) also runs the search policy (and its two ablations) trained for
    that many episodes of ``env.budget`` masks (0: untrained). ``parts``: as in
    :func:`search_curves`."""
    table = load_table(cfg)
    shared: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for test, train, split in split_folds(table):
        shared.setdefault(tuple(train), []).append((test, split))
    combos = [(seed, tests, list(train)) for seed in range(seeds) for train, tests in shared.items()]
    work = [
        (cfg, table, seed, tests, train, episodes, budgets, search_episodes) for seed, tests, train in combos
    ]
    keys = [
        fold_key(
            transfer_fold,
            cfg,
            table,
            [*(t for t, _ in tests), *train],
            seed,
            tests,
            episodes,
            budgets,
            search_episodes,
        )
        for seed, tests, train in combos
    ]
    return [row for rows in in_parallel(transfer_fold, work, workers, keys, parts) for row in rows]


SEARCH_VARIANTS = (
    ("ppo-search", False, False),
    ("ppo-search-no-descriptor", True, False),
    ("ppo-search-no-history", False, True),
)
"""The search policy and its two ablations: (label, descriptor zeroed, history zeroed)."""

ZERO_SHOT_TOP = 4
"""Zero-shot methods are also judged by the best of their first 2..4 masks (that many fine-tunes)."""


def transfer_fold(
    cfg: Config,
    table: BenchTable,
    seed: int,
    tests: list[tuple[int, str]],
    train: list[int],
    episodes: int,
    budgets: tuple[int, ...],
    search_episodes: int | None = None,
) -> list[dict[str, Any]]:
    """Every method's rows for the (test task, split) pairs of one training set and seed (the
    policies trained once, on ``train``): zero-shot lists judged at 1..:data:`ZERO_SHOT_TOP`
    fine-tunes, searches and the greedy portfolio (the hardest simple comparator) at each of
    ``budgets``; a task in two splits gets its rows twice."""
    from memrl.task import architecture_space

    names = [table.names[u] for u in train]
    one_shot = cfg.with_changes(ONE_SHOT_PPO)
    nets = {zero: train_policies(one_shot, names, seed, [episodes], zero)[0] for zero in (False, True)}
    searchers = {}
    if search_episodes is not None:
        for label, zero_d, zero_h in SEARCH_VARIANTS:
            searchers[label] = (
                train_policies(cfg, names, seed, [search_episodes], zero_d, "search", zero_h)[0],
                zero_d,
                zero_h,
            )
    group_names = architecture_space(cfg).names
    top, longest = ZERO_SHOT_TOP, max(budgets)
    fitted = {"regression": regression_model(prior_of(table, train), seed, table.param_weight)}
    rows = []
    splits: dict[int, list[str]] = {}
    for test, split in tests:
        splits.setdefault(test, []).append(split)
    for test, w in itertools.product(splits, PREFERENCES):
        regret = table.regret(w)[test]
        floor = float(table.noise_floor(w)[test])
        draws = sampler_seed(seed, table, test)

        def by_name(name: str, budget: int, test: int = test, w: float = w, seed: int = draws) -> list[int]:
            return searched(name, table, train, test, w, budget, seed, fitted=fitted)

        lists: dict[str, list[int]] = {
            "ppo": policy_masks(nets[False], table, test, w, top),
            "ppo-no-descriptor": policy_masks(nets[True], table, test, w, 1, zero=True),
            **{name: by_name(name, top) for name in ("nearest-task", "knn-tasks", "regression")},
            "gradient-top-g": by_name("gradient-top-g", 1),
            "single-best": by_name("single-best", 1),
            "single-best (mean reward)": by_name("single-best-reward", 1),
            **{f"preset: {label}": [mask_index(m)] for label, m in hand_presets(group_names).items()},
        }
        searches = {
            **{
                name: by_name(name, longest)
                for name in ("portfolio", "random", "tpe", "tpe-warm", "gp", "gp-prior")
            },
            **{
                label: search_policy_masks(policy, table, test, w, longest, zero_d, zero_h)
                for label, (policy, zero_d, zero_h) in searchers.items()
            },
        }
        judged: list[tuple[str, list[int], tuple[int, ...]]] = [
            (m, masks, tuple(range(1, len(masks) + 1))) for m, masks in lists.items()
        ]
        judged += [(m, masks, budgets) for m, masks in searches.items()]
        for (method, masks, counts), split in itertools.product(judged, splits[test]):
            for n in counts:
                value = best_regret(regret, masks[:n])
                rows.append(
                    {
                        "method": method,
                        "task": table.names[test],
                        "split": split,
                        "heldout": bool(table.heldout[test]),
                        "memorization_weight": w,
                        "seed": seed,
                        "fine_tunes": n,
                        "regret": value,
                        "noise_floor": floor,
                        "mask": "".join(map(str, table.masks[masks[0]])),
                    }
                )
    log.info("transfer: seed %d, test tasks %s done", seed, [table.names[t] for t in splits])
    return rows


TUNE_GRIDS: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {
    "ppo-search": ((3e-4,), (0, 1000, 2000, 4000)),
    "ppo": ((3e-4, 3e-3), (1000, 4000, 10000)),
    "regression": ((0.03, 0.1), (50, 200, 800)),
}
"""What ``tune`` tries per method: (learning rates, lengths); a length is training episodes for
the PPO policies (the search policy's 0: untrained, i.e. ``gp-prior``) and boosting iterations for
the regression. The search policy's grid: 3e-4 only (it beat 3e-3 at every length on 14 tasks,
2026-12-02), lengths up to 4,000 (2,000 had nearly caught up with 0)."""
TUNE_BUDGETS = {"ppo-search": (1, 2, 4, 8), "ppo": (1, 2, 3, 4), "regression": (1, 2, 3, 4)}
"""The fine-tunes a setting is judged at: the search policy's goal budgets, the lists' 1..4."""


def tune(
    cfg: Config,
    seeds: int,
    method: str = "ppo-search",
    workers: int = 1,
    parts: Path | None = None,
    nested: bool = False,
) -> list[dict[str, Any]]:
    """A method's settings (:data:`TUNE_GRIDS`) chosen without a held-out task: leave one
    *training* task out (fit on the other training tasks), regret at :data:`TUNE_BUDGETS` for
    every setting, preference and seed; one PPO training per (seed, learning rate, fold) gives
    every length as a snapshot. Each row's ``left_out`` names the tasks its fit did not see.

    ``nested`` also leaves out every pair of training tasks (each fit scored on both), so that
    :func:`nested_settings` can choose each leave-one-out fold's setting without its test task: the
    inner fold of outer task ``a`` and inner task ``b`` is the fit without ``a`` and ``b``, scored on
    ``b`` (one fit serves both outer tasks of a pair). ``parts``: as in :func:`search_curves`."""
    if method not in TUNE_GRIDS:
        raise ConfigError(f"tune --method {method!r} is not one of {list(TUNE_GRIDS)}")
    table = load_table(cfg)
    dev = [t for t in table.complete() if not table.heldout[t]]
    if len(dev) < (3 if nested else 2):
        what = "every pair of training tasks out" if nested else "one training task out"
        raise ConfigError(
            f"tune{' --nested' if nested else ''} leaves {what} and trains on the rest: the table has "
            f"{len(dev)} complete training task(s); build more (python -m memrl.tables build) or mark fewer "
            "tasks heldout in env.tasks"
        )
    rates, lengths = TUNE_GRIDS[method]
    left_outs = [[t] for t in dev] + ([[a, b] for a, b in itertools.combinations(dev, 2)] if nested else [])
    combos = [(seed, lr, out) for seed in range(seeds) for lr in rates for out in left_outs]
    work, keys = [], []
    for seed, lr, out in combos:
        train = [u for u in dev if u not in out]
        work.append((cfg, table, method, seed, lr, out, train, lengths))
        keys.append(fold_key(tune_fold, cfg, table, [*out, *train], method, seed, lr, lengths))
    return [row for rows in in_parallel(tune_fold, work, workers, keys, parts) for row in rows]


def tune_fold(
    cfg: Config,
    table: BenchTable,
    method: str,
    seed: int,
    lr: float,
    tests: list[int],
    train: list[int],
    lengths: tuple[int, ...],
) -> list[dict[str, Any]]:
    budgets = TUNE_BUDGETS[method]
    top = max(budgets)
    fitted: dict[int, Any]  # per length: a regression model or a policy
    if method == "regression":
        prior = prior_of(table, train)
        fitted = {n: regression_model(prior, seed, table.param_weight, n, lr) for n in lengths}
    else:
        mode = "search" if method == "ppo-search" else "mask"
        lr_cfg = cfg.with_changes({"ppo.learning_rate": lr})
        policies = train_policies(lr_cfg, [table.names[u] for u in train], seed, list(lengths), mode=mode)
        fitted = dict(zip(sorted(lengths), policies))

    def masks_of(length: int, test: int, w: float) -> list[int]:
        if method == "regression":
            return searched("regression", table, train, test, w, top, fitted={"regression": fitted[length]})
        if method == "ppo-search":
            return search_policy_masks(fitted[length], table, test, w, top)
        return policy_masks(fitted[length], table, test, w, top)

    left_out = LEFT_OUT_SEPARATOR.join(table.names[t] for t in tests)
    rows = []
    for test, length, w in itertools.product(tests, fitted, PREFERENCES):
        regret, masks = table.regret(w)[test], masks_of(length, test, w)
        rows += [
            {
                "method": method,
                "learning_rate": lr,
                "length": length,
                "task": table.names[test],
                "left_out": left_out,
                "memorization_weight": w,
                "seed": seed,
                "fine_tunes": n,
                "regret": best_regret(regret, masks[:n]),
            }
            for n in budgets
        ]
    log.info("tune %s: seed %d, lr %g, %s left out, done", method, seed, lr, left_out)
    return rows


LEFT_OUT_SEPARATOR = "+"
"""Joins the names of the tasks a tuning fit left out (task names never contain it)."""


def leave_one_out(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of fits that left out only the task they are scored on."""
    return [r for r in rows if r["left_out"] == r["task"]]


def setting_of(row: dict[str, Any]) -> tuple[float, int]:
    """A tuning row's (learning rate, length)."""
    return float(row["learning_rate"]), int(row["length"])


def chosen_setting(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """The (learning rate, length) with the lowest mean regret over tasks, preferences, seeds and
    budgets; ties go to the shorter length, then the smaller learning rate."""
    by: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        by.setdefault(setting_of(r), []).append(float(r["regret"]))
    return min(by, key=lambda s: (round(float(np.mean(by[s])), 6), s[1], s[0]))


def nested_settings(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per task (outer fold): the setting :func:`chosen_setting` picks from the inner folds alone,
    the fits that left out this task and one other, scored on the other (``tune(nested=True)``'s
    rows); this task's own results never enter its choice."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        inner = [
            r
            for r in rows
            if r["task"] != task and task in r["left_out"].split(LEFT_OUT_SEPARATOR)  # a pair without task
        ]
        if not inner:
            raise ConfigError(f"nested tuning: no inner fold for {task!r}; run tune with nested=True")
        out[task] = chosen_setting(inner)
    return out


def nested_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave one task out with each fold's setting chosen by :func:`nested_settings`: the honest
    leave-one-out score of a method whose settings are tuned."""
    chosen = nested_settings(rows)
    return [r for r in leave_one_out(rows) if setting_of(r) == chosen[r["task"]]]


RESULTS_VERSION = "2026-12-07b"  # b: the greedy portfolio is judged at every budget, as searches are
"""What the folds compute, as a version: part of every fold key, so a change that alters any
method's picks, PPO's training or a result row must set it anew (stored folds are then rerun),
and a change that moves or tidies code keeps every stored fold. The searchers' picks are pinned
by the hand-computed tests in tests/test_searchers.py, which fail before a silent change could."""


def fold_key(fn: Callable[..., Any], cfg: Config, table: BenchTable, tasks: list[int], *args: Any) -> str:
    """What one unit of an experiment depends on: the experiment, the config, the table rows of
    its tasks (test task first), its other arguments and :data:`RESULTS_VERSION`."""
    names = [table.names[t] for t in tasks]
    return stable_hash([fn.__name__, cfg.hash(), names, table.digest(tasks), args, RESULTS_VERSION])


def in_parallel(
    fn: Callable[..., Any],
    work: list[tuple[Any, ...]],
    workers: int,
    keys: list[str] | None = None,
    parts: Path | None = None,
) -> list[Any]:
    """``[fn(*args) for args in work]``, in ``workers`` single-threaded processes when above 1.

    With ``keys`` and ``parts``, each result is written to ``parts/<key>.json`` as soon as it is
    done and read back instead of recomputed, so an interrupted experiment resumes where it stopped.
    """
    from memrl.utils import atomic_write_text

    stored = [parts / f"{key}.json" for key in keys] if keys and parts else [None] * len(work)
    results: dict[int, Any] = {}
    for i, path in enumerate(stored):
        found = read_part(path) if path is not None and keys else None
        if found is not None:
            results[i] = found
    todo = [i for i in range(len(work)) if i not in results]
    if results:
        log.info("%d of %d results reused from %s; %d to run", len(results), len(work), parts, len(todo))

    def keep(i: int, result: Any) -> None:
        results[i] = result
        path = stored[i]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(_part(path.stem, result)))

    if workers <= 1:
        for i in todo:
            keep(i, fn(*work[i]))
    elif todo:
        import multiprocessing as mp
        import os

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
        with mp.get_context("spawn").Pool(workers, initializer=_single_threaded) as pool:
            for i, result in pool.imap_unordered(_indexed, [(i, fn, work[i]) for i in todo]):
                keep(i, result)
    return [results[i] for i in range(len(work))]


PART_FORMAT = 1
"""Version of a kept result's file: ``{"format", "key", "sha256", "rows"}``."""


def _part(key: str, rows: Any) -> dict[str, Any]:
    text = json.dumps(rows, sort_keys=True)
    return {
        "format": PART_FORMAT,
        "key": key,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "rows": rows,
    }


def read_part(path: Path) -> list[dict[str, Any]] | None:
    """The rows kept in ``path``, or None when there are none or they cannot be trusted: a
    symlink, unreadable or not JSON, another format or key, a digest that does not match the rows
    (edited by hand), or rows that are not a list of mappings. Every reason but a missing file is
    logged as a warning; the result is recomputed."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        if path.stat().st_size > 256 * 1024 * 1024:
            raise ValueError("larger than 256 MB")
        part = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT or part.get("key") != path.stem:
            raise ValueError("not a result file of this version")
        rows = part.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("its rows are not a list of records")
        if _part(path.stem, rows)["sha256"] != part.get("sha256"):
            raise ValueError("its content does not match its digest (edited?)")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("ignoring the kept result %s (%s); computing it again", path, exc)
        return None
    return rows


def _indexed(item: tuple[int, Callable[..., Any], tuple[Any, ...]]) -> tuple[int, Any]:
    i, fn, args = item
    return i, fn(*args)


def _single_threaded() -> None:
    import torch

    from memrl.utils import setup_logging

    torch.set_num_threads(1)
    setup_logging()
