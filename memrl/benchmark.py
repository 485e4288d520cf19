"""Is a learned policy worth reusing? Zero-shot transfer on the MemControl-Bench tables.

For each test task (leave-one-task-out over the training tasks, and each held-out task), each
preference and each seed, every method picks masks for the test task without having seen it; its
regret is read off the table, normalised per task and preference (0 = the task's best mask,
1 = the mask of ones). Methods:

* ``ppo`` / ``ppo-top4``: a preference-conditioned PPO policy trained on the other tasks (replay):
  its first proposal (0 fine-tunes) and the best of its 4 most probable masks (4 fine-tunes);
* ``ppo-no-descriptor``: the same PPO with the descriptor zeroed (if it matches ``ppo``, the
  descriptor carries no usable information);
* ``single-best``: the one mask with the best mean reward over the training tasks for the same
  preference (MemControl's way of reusing a mask); ``all-groups``: the mask of ones;
* ``regression``: a gradient-boosted regression from (descriptor, preference, mask) to reward
  trained on the same training rows, taking its argmax (as zero-shot HPO work does);
* ``random-N`` / ``tpe-N``: random search and Optuna TPE on the test task with N fine-tunes.

    python -m memrl.benchmark transfer --seeds 10 --timesteps 20000
    python -m memrl.benchmark search --seeds 10 --budget 64

``transfer`` writes ``transfer.csv`` (one row per method, task, preference, seed), ``transfer.md``
(interquartile mean regret with 95% bootstrap intervals, and the share of the gap between the
single best mask and the per-task optimum that each method closes) and ``transfer.png``.
``search`` is the other question: searching one task from scratch, best-so-far regret against
the number of distinct fine-tunes (1..64) for PPO, random search, TPE, NSGA-II and GP
(``search.csv``, ``search.md``, ``search.png``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config, load_config
from memrl.errors import MemrlError
from memrl.reward import References, Reward

log = logging.getLogger("memrl.benchmark")

TERMS = ("memorization_term", "quality_term", "param_term")
PREFERENCES = (0.25, 0.5, 0.75)
"""Memorization weights of the evaluation preferences (quality weight 1 minus it)."""
BUDGETS = (4, 8, 16, 32)


@dataclass
class BenchTable:
    """The tables of a suite as dense arrays (NaN where a mask is missing or failed)."""

    names: list[str]
    heldout: np.ndarray
    masks: np.ndarray
    """(M, K) every mask of the space, in binary counting order."""
    terms: np.ndarray
    """(T, M, 3) memorization, quality and parameter terms of every task and mask."""
    descriptors: np.ndarray
    """(T, D) task descriptors."""
    param_weight: float = 0.0

    def rewards(self, w: float) -> np.ndarray:
        """(T, M) rewards for memorization weight ``w`` (quality weight 1 - w)."""
        weights = np.array([w, 1.0 - w, self.param_weight])
        return -(self.terms @ weights)

    def regret(self, w: float) -> np.ndarray:
        """(T, M) regret: 0 = the task's best stored mask, 1 = the mask of ones."""
        r = self.rewards(w)
        best = np.nanmax(r, axis=1, keepdims=True)
        ones = r[:, -1:]
        return (best - r) / np.maximum(best - ones, 1e-9)

    def preference(self, w: float) -> np.ndarray:
        return np.array([w, 1.0 - w, self.param_weight], dtype=np.float32)


def load_table(cfg: Config) -> BenchTable:
    """Read every (task, mask) of ``cfg``'s suite from its tables and store (nothing is evaluated)."""
    from memrl.task import Task, make_evaluator, suite

    evaluator = make_evaluator(cfg)
    entries = suite(cfg)
    tasks = [Task(e.cfg, evaluator, e.name, e.heldout) for e in entries]
    k = tasks[0].space.k
    masks = np.array(list(itertools.product((0, 1), repeat=k)), dtype=np.int8)
    terms = np.full((len(tasks), len(masks), 3), np.nan)
    for t, task in enumerate(tasks):
        found = [evaluator.lookup(task.context.spec(m).hash) for m in masks]
        none, full = found[0], found[-1]
        if none is None or full is None or not (none.ok and full.ok):
            continue
        reward = Reward(cfg.reward, References(none.metrics, full.metrics))
        for i, ev in enumerate(found):
            if ev is not None and ev.ok:
                terms[t, i] = [reward.terms(ev.metrics)[key] for key in TERMS]
    descriptors = np.stack([t.descriptor() for t in tasks])
    return BenchTable(
        [t.name for t in tasks],
        np.array([t.heldout for t in tasks]),
        masks,
        terms,
        descriptors,
        cfg.reward.param_weight,
    )


# -- methods: each returns the mask indices it tries on the test task, in order ------------------
def single_best(table: BenchTable, train: list[int], w: float) -> int:
    """The mask with the best mean reward over the training tasks (masks missing anywhere skipped)."""
    mean = table.rewards(w)[train].mean(axis=0)
    return int(np.nanargmax(np.where(np.isfinite(mean), mean, -np.inf)))


def random_search(table: BenchTable, test: int, budget: int, rng: np.random.Generator) -> list[int]:
    available = np.flatnonzero(np.isfinite(table.terms[test, :, 0]))
    return [int(i) for i in rng.permutation(available)[:budget]]


def optuna_search(
    table: BenchTable, test: int, w: float, budget: int, seed: int, sampler: str = "tpe"
) -> list[int]:
    """Masks an Optuna sampler (``tpe``, ``gp``, or ``nsga2`` on the two terms) tries on the test
    task, in order; a missing or failed mask scores the failure penalty."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rewards, k = table.rewards(w)[test], table.masks.shape[1]
    terms = table.terms[test]
    startup = min(5, budget)
    if sampler == "nsga2":
        chosen: Any = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(16, budget // 2)))
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=chosen)
    else:
        cls = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.GPSampler
        study = optuna.create_study(direction="maximize", sampler=cls(seed=seed, n_startup_trials=startup))
    tried: list[int] = []

    def objective(trial: Any) -> Any:
        bits = [trial.suggest_int(f"g{j}", 0, 1) for j in range(k)]
        index = int("".join(map(str, bits)), 2)
        tried.append(index)
        if sampler == "nsga2":
            m, q = terms[index, 0], terms[index, 1]
            return (float(m), float(q)) if np.isfinite(m) else (2.0, 2.0)
        return float(rewards[index]) if np.isfinite(rewards[index]) else -2.0

    def enough(study: Any, trial: Any) -> None:  # a repeated mask is a stored evaluation: free
        if len(set(tried)) >= budget:
            study.stop()

    study.optimize(objective, n_trials=4 * budget, callbacks=[enough])
    return list(dict.fromkeys(tried))[:budget]


def ppo_search(cfg: Config, task: str, w: float, seed: int, budget: int, max_steps: int = 4000) -> list[int]:
    """Distinct masks PPO proposes while learning from scratch on one task (replay), in order, until
    ``budget`` distinct ones (= fine-tunes; a repeated mask is a stored evaluation) or ``max_steps``."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    from memrl.envs.memcontrol import MemControlEnv

    one = load_config(
        cfg,
        {
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") == task],
            "env.preferences": "fixed",
            "reward.memorization_weight": w,
            "reward.quality_weight": 1.0 - w,
            "seed": seed,
        },
    )
    seen: list[int] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                index = int("".join(map(str, info["mask"])), 2)
                if index not in seen:
                    seen.append(index)
            return len(seen) < budget

    torch.manual_seed(seed)
    model = PPO(
        "MlpPolicy",
        MemControlEnv(one),
        n_steps=8,
        batch_size=8,
        n_epochs=10,
        learning_rate=3e-3,
        ent_coef=0.01,
        seed=seed,
        device="cpu",
        verbose=0,
        policy_kwargs={"net_arch": [32, 32]},
    )
    model.learn(max_steps, callback=Record())
    return seen[:budget]


def search_curves(cfg: Config, seeds: int, budget: int = 64, ppo_steps: int = 4000) -> list[dict[str, Any]]:
    """Best-so-far regret against distinct fine-tunes (1..budget) when searching one task from
    scratch: PPO, random, TPE, NSGA-II and GP; one row per method, task, preference, seed and n."""
    table = load_table(cfg)
    complete = [t for t in range(len(table.names)) if np.isfinite(table.terms[t, :, 0]).all()]
    rows: list[dict[str, Any]] = []
    for seed, test, w in itertools.product(range(seeds), complete, PREFERENCES):
        regret = table.regret(w)[test]
        tried = {
            "ppo": ppo_search(cfg, table.names[test], w, seed, budget, ppo_steps),
            "random": random_search(table, test, budget, np.random.default_rng(seed)),
            **{name: optuna_search(table, test, w, budget, seed, name) for name in ("tpe", "nsga2", "gp")},
        }
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


def regression(table: BenchTable, train: list[int], test: int, w: float, seed: int) -> int:
    """Argmax of a regression from (descriptor, preference, mask) to reward fit on ``train``."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    def features(t: int, weight: float) -> np.ndarray:
        n = len(table.masks)
        d = np.repeat(table.descriptors[t][None], n, 0)
        p = np.repeat(table.preference(weight)[None], n, 0)
        return np.concatenate([d, p, table.masks], axis=1)

    xs, ys = [], []
    for t in train:
        for weight in np.linspace(0, 1, 11):
            r = table.rewards(weight)[t]
            keep = np.isfinite(r)
            xs.append(features(t, weight)[keep])
            ys.append(r[keep])
    model = HistGradientBoostingRegressor(random_state=seed, max_iter=200).fit(
        np.concatenate(xs), np.concatenate(ys)
    )
    predicted = model.predict(features(test, w))
    predicted[~np.isfinite(table.terms[test, :, 0])] = -np.inf
    return int(np.argmax(predicted))


def train_policy(cfg: Config, tasks: list[str], seed: int, timesteps: int, zero_descriptor: bool) -> Any:
    """PPO trained by replay on ``tasks`` with uniformly drawn preferences; returns its network."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    from memrl.envs.memcontrol import MemControlEnv

    train_cfg = load_config(
        cfg,
        {
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") in tasks],
            "env.preferences": "uniform",
            "env.mode": "mask",
            "seed": seed,
        },
    )
    env: Any = MemControlEnv(train_cfg)
    if zero_descriptor:
        env = gym.wrappers.TransformObservation(env, _zero_descriptor, env.observation_space)
    p = train_cfg.ppo
    torch.manual_seed(seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=p.n_steps,
        batch_size=p.batch_size,
        n_epochs=p.n_epochs,
        learning_rate=p.learning_rate,
        gamma=p.gamma,
        ent_coef=p.ent_coef,
        seed=seed,
        policy_kwargs={"net_arch": list(p.net_arch)},
        device="cpu",
        verbose=0,
    )
    model.learn(timesteps)
    return model.policy


def _zero_descriptor(obs: np.ndarray) -> np.ndarray:
    """The observation with its descriptor part zeroed (only the preference is left)."""
    from memrl.data.descriptor import DESCRIPTOR_FIELDS

    out = obs.copy()
    out[: len(DESCRIPTOR_FIELDS)] = 0
    return out


def policy_masks(network: Any, table: BenchTable, test: int, w: float, n: int, zero: bool) -> list[int]:
    """The ``n`` most probable masks of a mask-mode policy network, as table indices."""
    import torch

    descriptor = np.zeros_like(table.descriptors[test]) if zero else table.descriptors[test]
    obs = np.concatenate([descriptor, table.preference(w)]).astype(np.float32)
    with torch.no_grad():
        probs = network.get_distribution(torch.as_tensor(obs[None])).distribution.probs[0].numpy()
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    logp = table.masks @ np.log(p) + (1 - table.masks) @ np.log(1 - p)
    return [int(i) for i in np.argsort(-logp)[:n]]


# -- the benchmark --------------------------------------------------------------------------------
def best_regret(regret: np.ndarray, tried: list[int]) -> float:
    values = regret[tried]
    values = values[np.isfinite(values)]
    return float(values.min()) if len(values) else float("nan")


def transfer(
    cfg: Config, seeds: int, timesteps: int, budgets: tuple[int, ...] = BUDGETS
) -> list[dict[str, Any]]:
    """Regret of every method on every test task, preference and seed (one row each)."""
    table = load_table(cfg)
    complete = [t for t in range(len(table.names)) if np.isfinite(table.terms[t, :, 0]).all()]
    if len(complete) < 2:
        raise MemrlError(
            f"the tables hold {len(complete)} complete task(s) of {len(table.names)}; a transfer "
            "benchmark needs two or more: continue them with python -m memrl.tables build"
        )
    training = [t for t in complete if not table.heldout[t]]
    folds = [(t, [u for u in training if u != t]) for t in training]
    folds += [(t, training) for t in complete if table.heldout[t]]
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        for test, train in folds:
            if not train:
                continue
            names = [table.names[u] for u in train]
            nets = {zero: train_policy(cfg, names, seed, timesteps, zero) for zero in (False, True)}
            for w in PREFERENCES:
                regret = table.regret(w)[test]
                rng = np.random.default_rng(seed)
                tried: dict[str, list[int]] = {
                    "ppo": policy_masks(nets[False], table, test, w, 1, False),
                    "ppo-top4": policy_masks(nets[False], table, test, w, 4, False),
                    "ppo-no-descriptor": policy_masks(nets[True], table, test, w, 1, True),
                    "single-best": [single_best(table, train, w)],
                    "all-groups": [len(table.masks) - 1],
                    "regression": [regression(table, train, test, w, seed)],
                }
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
            log.info("seed %d, test task %s: done", seed, table.names[test])
    return rows


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50%."""
    v = np.sort(values[np.isfinite(values)])
    lo, hi = int(np.floor(0.25 * len(v))), int(np.ceil(0.75 * len(v)))
    return float(v[lo:hi].mean()) if hi > lo else float(np.mean(v))


def bootstrap(
    values: np.ndarray, stat: Callable[[np.ndarray], float], n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat``."""
    rng = np.random.default_rng(seed)
    draws = [stat(rng.choice(values, len(values))) for _ in range(n)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def summarise(rows: list[dict[str, Any]]) -> str:
    """Markdown: IQM regret [95% CI] per method, zero-shot on training tasks (LOTO) and held out,
    and the share of the single-best-to-optimum gap closed."""
    out = [
        "| method | fine-tunes | LOTO IQM regret [95% CI] | held-out IQM regret [95% CI] | gap closed |",
        "|---|---|---|---|---|",
    ]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = np.array([r["regret"] for r in rows if r["method"] == "single-best"])
    for method in methods:
        cells = []
        mine = [r for r in rows if r["method"] == method]
        for heldout in (False, True):
            v = np.array([r["regret"] for r in mine if r["heldout"] == heldout])
            cells.append(
                f"{iqm(v):.3f} [{bootstrap(v, iqm)[0]:.3f}, {bootstrap(v, iqm)[1]:.3f}]" if len(v) else "-"
            )
        closed = 1 - np.nanmean([r["regret"] for r in mine]) / max(float(np.nanmean(base)), 1e-9)
        out.append(f"| {method} | {mine[0]['fine_tunes']} | {cells[0]} | {cells[1]} | {closed:+.2f} |")
    return "\n".join(out)


def plot_transfer(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars: IQM regret with 95% bootstrap intervals per method, LOTO and held-out side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.report import save_figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(methods)), 3.5))
    for offset, heldout in ((-0.2, False), (0.2, True)):
        stats = []
        for m in methods:
            v = np.array([r["regret"] for r in rows if r["method"] == m and r["heldout"] == heldout])
            stats.append((iqm(v), *bootstrap(v, iqm)) if len(v) else (np.nan, np.nan, np.nan))
        mid, lo, hi = map(np.array, zip(*stats))
        ax.bar(
            np.arange(len(methods)) + offset,
            mid,
            0.4,
            yerr=[mid - lo, hi - mid],
            label="held-out tasks" if heldout else "leave-one-task-out",
            capsize=2,
        )
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IQM regret (0 = best mask, 1 = all groups)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> str:
    """Best-so-far regret (IQM over tasks, preferences, seeds) against distinct fine-tunes; returns
    the Markdown table at 1, 2, 4, ..., the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.report import save_figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    budget = max(r["fine_tunes"] for r in rows)
    marks = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= budget]
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = ["| method | " + " | ".join(f"n={n}" for n in marks) + " |", "|---|" + "---|" * len(marks)]
    for m in methods:
        curve = [
            iqm(np.array([r["regret"] for r in rows if r["method"] == m and r["fine_tunes"] == n]))
            for n in range(1, budget + 1)
        ]
        ax.plot(range(1, budget + 1), curve, label=m)
        lines.append(f"| {m} | " + " | ".join(f"{curve[n - 1]:.3f}" for n in marks) + " |")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct fine-tunes")
    ax.set_ylabel("best-so-far regret (IQM)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return "\n".join(lines)


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    from memrl.utils import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    from memrl.cli import add_config_args, config_from_args, run_main
    from memrl.utils import atomic_write_text, setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m memrl.benchmark",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("command", choices=("transfer", "search"), nargs="?", default="transfer")
    add_config_args(parser, seed=False)
    parser.set_defaults(config="bench")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--timesteps", type=int, default=20000, help="transfer: PPO steps per training")
    parser.add_argument("--budget", type=int, default=64, help="search: distinct fine-tunes per search")
    parser.add_argument("--out", type=Path, default=Path("bench/results/benchmark"))
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> int:
        start = time.perf_counter()
        cfg = config_from_args(args)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.command == "transfer":
            rows = transfer(cfg, args.seeds, args.timesteps)
            text = summarise(rows)
            plot_transfer(rows, args.out / "transfer.png")
        else:
            rows = search_curves(cfg, args.seeds, args.budget)
            text = plot_curves(rows, args.out / "search.png")
        _write_rows(rows, args.out / f"{args.command}.csv")
        footer = f"\n\n{args.seeds} seeds; {time.perf_counter() - start:.0f} s\n"
        atomic_write_text(args.out / f"{args.command}.md", text + footer)
        print(text)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
