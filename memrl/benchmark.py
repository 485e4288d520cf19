"""Is a learned policy worth reusing? Zero-shot transfer on the MemControl-Bench tables.

For each test task (leave-one-task-out over the training tasks, and each held-out task), each
preference and each seed, every method picks masks for the test task without having seen it; its
regret is read off the table, normalised per task and preference: 0 = the task's best mask, 1 = its
worst. (Not 1 = the mask of ones: on tasks where fine-tuning induces little memorization the mask
of ones is the best mask or close to it, and a regret scaled by it is undefined or explodes.)
Methods:

* ``ppo`` / ``ppo-topK``: a preference-conditioned PPO policy trained on the other tasks (replay):
  its first proposal (0 fine-tunes) and the best of its K most probable masks (K = 2..4 fine-tunes);
* ``ppo-no-descriptor``: the same PPO with the descriptor zeroed (if it matches ``ppo``, the
  descriptor carries no usable information);
* ``single-best``: the one mask with the best mean reward over the training tasks for the same
  preference (MemControl's way of reusing a mask); ``preset: ...``: the hand-picked masks (the
  attention of the down blocks, the mid block, the up blocks, and all attention = the mask of ones);
* ``regression``: a gradient-boosted regression from (descriptor, preference, mask) to reward
  trained on the same training rows, taking its argmax (as zero-shot HPO work does);
* ``random-N`` / ``tpe-N``: random search and Optuna TPE on the test task with N fine-tunes.

    python -m memrl.benchmark transfer --seeds 10    # PPO episodes: ppo.total_timesteps (--episodes)
    python -m memrl.benchmark modes --seeds 3
    python -m memrl.benchmark claims
    python -m memrl.benchmark findings              # best masks per task, seed noise (no method runs)
    python -m memrl.benchmark ship                  # trains the shipped policy (memrl/assets/policy)
    python -m memrl.benchmark search --seeds 10 --budget 64

``transfer`` writes ``transfer.csv`` (one row per method, task, preference, seed), ``transfer.md``
(interquartile mean regret with 95% bootstrap intervals, and the share of the gap between the
single best mask and the per-task optimum that each method closes) and ``transfer.png``.
``modes`` compares mask mode with sequential mode (one group per step): the zero-shot regret of
each one's first proposal after the same numbers of training episodes (``modes.*``).
``claims`` checks the MemControl paper's findings at small scale (``claims.*``): full fine-tuning
memorizes more than the attention presets; memorization grows with duplication; searched masks
against the presets on the Pareto front.
``search`` is the other question: searching one task from scratch, best-so-far regret against
the number of distinct fine-tunes (1..64) for PPO, random search, TPE, NSGA-II and GP
(``search.csv``, ``search.md``, ``search.png``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
        """(T, M) regret: 0 = the task's best stored mask, 1 = its worst."""
        r = self.rewards(w)
        best = np.nanmax(r, axis=1, keepdims=True)
        worst = np.nanmin(r, axis=1, keepdims=True)
        return (best - r) / np.maximum(best - worst, 1e-9)

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


SEARCH_PPO = {
    "ppo.n_steps": 8,
    "ppo.batch_size": 8,
    "ppo.n_epochs": 10,
    "ppo.learning_rate": 3e-3,
    "ppo.ent_coef": 0.01,
}
"""PPO searching one task from scratch: short rollouts, many epochs (every sample is a fine-tune)."""


def ppo_search(cfg: Config, task: str, w: float, seed: int, budget: int, max_steps: int = 4000) -> list[int]:
    """Distinct masks PPO proposes while learning from scratch on one task (replay), in order, until
    ``budget`` distinct ones (= fine-tunes; a repeated mask is a stored evaluation) or ``max_steps``."""
    from stable_baselines3.common.callbacks import BaseCallback

    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv

    one = load_config(
        cfg,
        {
            **SEARCH_PPO,
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
                if "mask" in info:
                    index = mask_index(info["mask"])
                    if index not in seen:
                        seen.append(index)
            return len(seen) < budget

    build_ppo(one, MemControlEnv(one)).learn(max_steps, callback=Record())
    return seen[:budget]


def mask_index(mask: Any) -> int:
    """A mask's row in :attr:`BenchTable.masks` (binary counting order)."""
    return int("".join(str(int(v)) for v in mask), 2)


def search_curves(
    cfg: Config, seeds: int, budget: int = 64, ppo_steps: int = 4000, workers: int = 1
) -> list[dict[str, Any]]:
    """Best-so-far regret against distinct fine-tunes (1..budget) when searching one task from
    scratch: PPO, random, TPE, NSGA-II and GP; one row per method, task, preference, seed and n."""
    table = load_table(cfg)
    complete = [t for t in range(len(table.names)) if np.isfinite(table.terms[t, :, 0]).all()]
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


def train_policies(
    cfg: Config,
    tasks: list[str],
    seed: int,
    episodes: list[int],
    zero_descriptor: bool = False,
    mode: str = "mask",
) -> list[Any]:
    """PPO trained by replay on ``tasks`` with uniformly drawn preferences: a
    :class:`~memrl.agents.policy.Policy` snapshot after each count of ``episodes`` (= masks
    evaluated; a sequential episode is several steps). ``zero_descriptor`` hides the descriptor."""
    import copy

    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback

    from memrl.agents.policy import Policy
    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv

    train_cfg = load_config(
        cfg,
        {
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") in tasks],
            "env.preferences": "uniform",
            "env.mode": mode,
            "seed": seed,
        },
    )
    env: Any = MemControlEnv(train_cfg)
    if zero_descriptor:
        env = gym.wrappers.TransformObservation(env, _zero_descriptor, env.observation_space)

    class Episodes(BaseCallback):
        target, done = 0, 0

        def _on_step(self) -> bool:
            self.done += int(sum(self.locals["dones"]))
            return self.done < self.target

    model, counter, out = build_ppo(train_cfg, env), Episodes(), []
    steps_per_episode = 1 if mode == "mask" else env.unwrapped.k + 1
    for target in sorted(episodes):
        counter.target = target
        model.learn(steps_per_episode * (target - counter.done), callback=counter, reset_num_timesteps=False)
        snapshot = Policy.of_model(model, train_cfg)
        out.append(dataclasses.replace(snapshot, network=copy.deepcopy(model.policy)))
    return out


def _zero_descriptor(obs: np.ndarray) -> np.ndarray:
    """The observation with its descriptor part zeroed (only the preference is left)."""
    from memrl.data.descriptor import DESCRIPTOR_FIELDS

    out = obs.copy()
    out[: len(DESCRIPTOR_FIELDS)] = 0
    return out


def policy_masks(
    policy: Any, table: BenchTable, test: int, w: float, n: int, zero: bool = False
) -> list[int]:
    """The ``n`` most probable masks of ``policy`` for the test task (one for a sequential
    policy), as table indices."""
    descriptor = np.zeros_like(table.descriptors[test]) if zero else table.descriptors[test]
    return [mask_index(m) for m in policy.candidates(descriptor, n, table.preference(w))]


# -- what the tables say before any method runs ---------------------------------------------------
NOISE_METRICS = (
    "canary_loss_gap",
    "heldout_loss",
    "canary_copy_fraction",
    "near_copy_fraction",
    "kid",
    "fid",
)


def findings(cfg: Config) -> str:
    """Markdown: per complete task and preference, the best mask and the regret of the mask of ones
    and of the single best mask across tasks; how often the optimum differs between tasks; how
    alike the tasks rank the masks; and each metric's seed noise against its spread across masks."""
    from scipy.stats import spearmanr

    from memrl.tables import NOISE_SEEDS, noise_masks
    from memrl.task import TaskContext, make_evaluator, suite

    table = load_table(cfg)
    done = [t for t in range(len(table.names)) if np.isfinite(table.terms[t, :, 0]).all()]
    if not done:
        raise MemrlError("no task of the suite has a complete table yet: python -m memrl.tables build")
    key = "".join
    out = [f"Complete tasks: {len(done)} of {len(table.names)}.", ""]
    for w in PREFERENCES:
        regret = table.regret(w)
        single = single_best(table, done, w)
        out += [
            f"**Memorization weight {w}** (regret: 0 = the task's best mask, 1 = its worst). "
            f"Single best mask across these tasks: `{key(map(str, table.masks[single]))}`.",
            "",
            "| task | best mask | reward best / all groups | regret of the single best mask |",
            "|---|---|---|---|",
        ]
        rewards = table.rewards(w)
        for t in done:
            best = int(np.nanargmin(regret[t]))
            out.append(
                f"| {table.names[t]} | `{key(map(str, table.masks[best]))}` | {rewards[t, best]:+.3f} / "
                f"{rewards[t, -1]:+.3f} | {regret[t, single]:.3f} |"
            )
        optima = {int(np.nanargmin(regret[t])) for t in done}
        out += ["", f"{len(optima)} distinct optima over {len(done)} tasks.", ""]
    if len(done) > 1:
        r = table.rewards(0.5)[done]
        rho = [spearmanr(r[a], r[b])[0] for a, b in itertools.combinations(range(len(done)), 2)]
        out += [
            f"Rank correlation of the 128 masks' rewards (w=0.5) between tasks: Spearman from "
            f"{min(rho):.2f} to {max(rho):.2f} (mean {np.mean(rho):.2f}).",
            "",
        ]
    evaluator = make_evaluator(cfg)
    lines = []
    for entry in suite(cfg):
        contexts = [TaskContext.get(load_config(entry.cfg, {"finetune.seed": s})) for s in (0, *NOISE_SEEDS)]
        masks = noise_masks(contexts[0].space.k)
        found = [[evaluator.lookup(c.spec(m).hash) for c in contexts] for m in masks]
        if not all(ev is not None and ev.ok for row in found for ev in row):
            continue
        t = table.names.index(entry.name)
        every = [evaluator.lookup(contexts[0].spec(m).hash) for m in table.masks]
        for metric in NOISE_METRICS:
            per_mask = np.array([[ev.metrics[metric] for ev in row] for row in found])
            noise = float(np.mean(per_mask.std(axis=1, ddof=1)))
            spread = float(np.std([ev.metrics[metric] for ev in every if ev is not None], ddof=1))
            ratio = f"{noise / spread:.2f}" if spread > 0 else "-"
            lines.append(f"| {table.names[t]} | {metric} | {noise:.4f} | {spread:.4f} | {ratio} |")
    if lines:
        out += [
            f"Seed noise ({len(NOISE_SEEDS) + 1} fine-tune seeds x 16 masks: the mean over masks of the "
            "standard deviation over seeds) against the spread across all 128 masks (seed 0):",
            "",
            "| task | metric | seed noise | spread across masks | noise / spread |",
            "|---|---|---|---|---|",
            *lines,
        ]
    return "\n".join(out)


# -- the shipped policy ---------------------------------------------------------------------------
def ship(cfg: Config, out: Path, results: Path) -> Path:
    """Train the policy that ships with memrl: PPO by replay on every training task of the suite
    whose table is complete (see :func:`memrl.train_agent.train`), with uniformly drawn
    preferences; write ``policy.zip`` and its card to ``out``. The card carries the transfer
    benchmark's numbers from ``results/transfer.csv`` (the same recipe, judged leave-one-task-out
    and on the held-out tasks) when present."""
    import json
    import shutil
    import tempfile

    from memrl.agents.policy import card_path, read_card
    from memrl.train_agent import train
    from memrl.utils import atomic_path, atomic_write_text

    ship_cfg = load_config(cfg, {"env.preferences": "uniform", "env.store": None})
    with tempfile.TemporaryDirectory() as tmp:
        policy = train(ship_cfg, Path(tmp) / "run", report=False)
        card = read_card(card_path(policy))
        ship_cfg = load_config(card["config"], {"env.store": None})  # without the run's store
        card["config"], card["config_hash"] = ship_cfg.to_dict(), ship_cfg.hash()
        if (results / "transfer.csv").is_file():
            card["benchmark"] = transfer_numbers(results / "transfer.csv")
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "policy.zip") as dest:
            shutil.copyfile(policy, dest)
        atomic_write_text(card_path(out / "policy.zip"), json.dumps(card, indent=2))
    return out / "policy.zip"


def transfer_numbers(path: Path) -> dict[str, Any]:
    """Per method: IQM regret leave-one-task-out and on the held-out tasks, from ``transfer.csv``."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, Any] = {"source": str(path), "seeds": len({r["seed"] for r in rows})}
    for method in dict.fromkeys(r["method"] for r in rows):
        out[method] = {
            split: round(
                iqm(
                    np.array(
                        [float(r["regret"]) for r in rows if r["method"] == method and r["heldout"] == flag]
                    )
                ),
                4,
            )
            for split, flag in (("loto_iqm_regret", "False"), ("heldout_iqm_regret", "True"))
            if any(r["method"] == method and r["heldout"] == flag for r in rows)
        }
    return out


# -- the MemControl paper's claims at small scale -------------------------------------------------
CLAIM_METRICS = ("near_copy_fraction", "canary_copy_fraction")


def presets(names: list[str]) -> dict[str, np.ndarray]:
    """The hand-picked masks: attention of the down blocks, the mid block, the up blocks, and all
    attention (the mask of ones)."""
    out = {}
    for family in ("down_blocks", "mid_block", "up_blocks"):
        mask = np.array([int(n.split(".")[0] == family) for n in names], dtype=np.int8)
        if 0 < mask.sum() < len(names):
            out[f"{family.replace('_', '-')} attention"] = mask
    out["all attention"] = np.ones(len(names), dtype=np.int8)
    return out


def claims(cfg: Config, path: Path) -> tuple[list[dict[str, Any]], str]:
    """Per complete task: memorization and quality of no fine-tune, full fine-tuning of every UNet
    parameter, the presets and the searched masks; which of them lie on the Pareto front
    (memorization metric and quality metric, both minimised). Writes the planes to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.report import save_figure
    from memrl.reward import pareto_front
    from memrl.task import Task, TaskContext, full_unet, make_evaluator, suite

    table = load_table(cfg)
    evaluator = make_evaluator(cfg)
    mem, qual = cfg.reward.memorization, cfg.reward.quality
    rows: list[dict[str, Any]] = []
    planes = []
    for t, entry in enumerate(suite(cfg)):
        if not np.isfinite(table.terms[t, :, 0]).all():
            continue
        task = Task(entry.cfg, evaluator, entry.name, entry.heldout)
        whole = TaskContext.get(full_unet(entry.cfg))
        full = evaluator.lookup(whole.spec((1,) * whole.space.k).hash)
        found = [evaluator.lookup(task.context.spec(m).hash) for m in table.masks]
        points = np.array([[ev.metrics[mem], ev.metrics[qual]] for ev in found])
        named = {"no fine-tune": 0, **{n: mask_index(m) for n, m in presets(task.space.names).items()}}
        best = int(np.nanargmin(table.regret(0.5)[t]))
        named["searched (best at w=0.5)"] = best
        front = pareto_front(points)
        d = entry.cfg.data
        for label, index in named.items():
            rows.append(
                {
                    "task": entry.name,
                    "private_size": d.private_size,
                    "duplication": d.duplication,
                    "canaries": d.canaries,
                    "mask_kind": label,
                    "mask": "".join(map(str, table.masks[index])),
                    mem: float(points[index, 0]),
                    qual: float(points[index, 1]),
                    **{k: found[index].metrics.get(k) for k in CLAIM_METRICS},
                    "on_pareto_front": bool(front[index]),
                }
            )
        if full is not None and full.ok:
            dominated = bool((np.all(points <= [full.metrics[mem], full.metrics[qual]], axis=1)).any())
            rows.append(
                {
                    "task": entry.name,
                    "private_size": d.private_size,
                    "duplication": d.duplication,
                    "canaries": d.canaries,
                    "mask_kind": "full fine-tune (every parameter)",
                    "mask": "1" * whole.space.k,
                    mem: full.metrics[mem],
                    qual: full.metrics[qual],
                    **{k: full.metrics.get(k) for k in CLAIM_METRICS},
                    "on_pareto_front": not dominated,
                }
            )
        planes.append((entry.name, points, front, named, full))
    if not planes:
        raise MemrlError("no task of the suite has a complete table yet: python -m memrl.tables build")
    cols = min(4, len(planes))
    fig, axes = plt.subplots(
        -(-len(planes) // cols), cols, figsize=(3.6 * cols, 3.2 * -(-len(planes) // cols)), squeeze=False
    )
    for ax, (name, points, front, named, full) in zip(axes.flat, planes):
        ax.scatter(points[:, 0], points[:, 1], s=8, c="0.75", label="every mask")
        order = np.argsort(points[front, 0])
        ax.plot(points[front][order, 0], points[front][order, 1], "r--", lw=1, label="Pareto front")
        for (label, index), marker in zip(named.items(), "sv^<>*D"):
            ax.scatter(*points[index], marker=marker, s=45, label=label)
        if full is not None and full.ok:
            ax.scatter(full.metrics[mem], full.metrics[qual], marker="X", s=60, c="k", label="full fine-tune")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(mem, fontsize=8)
        ax.set_ylabel(qual, fontsize=8)
    for ax in list(axes.flat)[len(planes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    save_figure(fig, path)
    plt.close(fig)
    return rows, claims_text(rows, mem, qual)


def claims_text(rows: list[dict[str, Any]], mem: str, qual: str) -> str:
    """Markdown: the per-task table and the three claims checked on it."""
    lines = [
        f"| task | private / dup / canaries | mask | {mem} | {qual} | near copies | canary copies "
        "| on front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['private_size']} / {r['duplication']} / {r['canaries']} | {r['mask_kind']} "
            f"`{r['mask']}` | {r[mem]:.4f} | {r[qual]:.4f} | {r['near_copy_fraction']:.3f} | "
            f"{r['canary_copy_fraction']:.3f} | {'yes' if r['on_pareto_front'] else ''} |"
        )
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["mask_kind"]] = r
    full = [t for t in by_task.values() if "full fine-tune (every parameter)" in t]
    more = sum(t["full fine-tune (every parameter)"][mem] > t["all attention"][mem] for t in full)
    searched = sum(t["searched (best at w=0.5)"]["on_pareto_front"] for t in by_task.values())
    preset_front = sum(r["on_pareto_front"] for r in rows if r["mask_kind"].endswith("attention"))
    n_presets = sum(r["mask_kind"].endswith("attention") for r in rows)
    dup = sorted(
        (t["all attention"]["duplication"], t["all attention"][mem], name)
        for name, t in by_task.items()
        if name.startswith("digits")
    )
    lines += [
        "",
        f"- Full fine-tuning memorizes more ({mem}) than fine-tuning all attention in {more} of "
        f"{len(full)} tasks.",
        f"- Presets on the Pareto front of all 128 masks: {preset_front} of {n_presets} (task, preset) "
        "pairs; every other preset is dominated by a mask a search finds (a best mask at any weight "
        f"is on the front by construction: {searched} of {len(by_task)} here).",
        "- Memorization against duplication (digits tasks, all attention): "
        + ", ".join(f"{name} (x{d}) {v:.4f}" for d, v, name in dup)
        + " (sizes and canaries differ too).",
    ]
    return "\n".join(lines)


# -- the benchmark --------------------------------------------------------------------------------
def best_regret(regret: np.ndarray, tried: list[int]) -> float:
    values = regret[tried]
    values = values[np.isfinite(values)]
    return float(values.min()) if len(values) else float("nan")


def folds(table: BenchTable) -> list[tuple[int, list[int]]]:
    """(test task, training tasks): leave-one-task-out over the complete training tasks, then each
    complete held-out task against all of them."""
    complete = [t for t in range(len(table.names)) if np.isfinite(table.terms[t, :, 0]).all()]
    if len(complete) < 2:
        raise MemrlError(
            f"the tables hold {len(complete)} complete task(s) of {len(table.names)}; a transfer "
            "benchmark needs two or more: continue them with python -m memrl.tables build"
        )
    training = [t for t in complete if not table.heldout[t]]
    out = [(t, [u for u in training if u != t]) for t in training]
    out += [(t, training) for t in complete if table.heldout[t]]
    return [(test, train) for test, train in out if train]


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
    ax.set_ylabel("IQM regret (0 = best mask, 1 = worst)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_curves(
    rows: list[dict[str, Any]], path: Path, x: str = "fine_tunes", xlabel: str = "distinct fine-tunes"
) -> str:
    """Regret (IQM over tasks, preferences, seeds) of each method against ``x``; returns the
    Markdown table at powers of two (or at every value of ``x`` when there are few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.report import save_figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    xs = sorted({r[x] for r in rows})
    marks = xs if len(xs) <= 8 else [n for n in xs if n & (n - 1) == 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    header = f"| method / {xlabel} | " + " | ".join(str(n) for n in marks) + " |"
    lines = [header, "|---|" + "---|" * len(marks)]
    for m in methods:
        curve = {n: iqm(np.array([r["regret"] for r in rows if r["method"] == m and r[x] == n])) for n in xs}
        ax.plot(xs, [curve[n] for n in xs], marker="o" if len(xs) <= 8 else None, label=m)
        lines.append(f"| {m} | " + " | ".join(f"{curve[n]:.3f}" for n in marks) + " |")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("regret (IQM; 0 = best mask, 1 = worst)")
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
    parser.add_argument(
        "command",
        choices=("transfer", "search", "modes", "claims", "findings", "ship"),
        nargs="?",
        default="transfer",
    )
    add_config_args(parser, seed=False)
    parser.set_defaults(config="bench")
    parser.add_argument("--seeds", type=int, default=10, help="named seeds 0..N-1 per method")
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="transfer: PPO training episodes (default: ppo.total_timesteps)",
    )
    parser.add_argument("--budget", type=int, default=64, help="search: distinct fine-tunes per search")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/benchmark"), help="results (and ship's transfer.csv)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="single-threaded processes side by side (2 cores: 2)"
    )
    parser.add_argument(
        "--ship-to",
        type=Path,
        default=None,
        help="ship: where the policy goes (default: memrl/assets/policy)",
    )
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> int:
        start = time.perf_counter()
        cfg = config_from_args(args)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.command == "transfer":
            rows = transfer(cfg, args.seeds, args.episodes or cfg.ppo.total_timesteps, workers=args.workers)
            text = summarise(rows)
            plot_transfer(rows, args.out / "transfer.png")
        elif args.command == "ship":
            from memrl.agents.policy import shipped_policy

            path = ship(cfg, args.ship_to or shipped_policy().parent, args.out)
            print(f"policy: {path}")
            return 0
        elif args.command == "findings":
            rows, text = [], findings(cfg)
        elif args.command == "claims":
            rows, text = claims(cfg, args.out / "claims.png")
        elif args.command == "modes":
            rows = modes(cfg, args.seeds, workers=args.workers)
            text = plot_curves(rows, args.out / "modes.png", "episodes", "training episodes")
        else:
            rows = search_curves(cfg, args.seeds, args.budget, workers=args.workers)
            text = plot_curves(rows, args.out / "search.png")
        if rows:
            _write_rows(rows, args.out / f"{args.command}.csv")
        footer = f"\n\n{args.seeds} seeds; {time.perf_counter() - start:.0f} s\n"
        atomic_write_text(args.out / f"{args.command}.md", text + footer)
        print(text)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
