"""Fixed recipes and stopping rules on the curve tables: the comparators a controller that acts
during the fine-tune must beat (issue 52). Each rule delivers, for a test task and preference, a
(mask, checkpoint) of the curve table, every setting of it fixed on the training tasks only.

Regret of a delivered recipe: 0 = the test task's best stored (mask, checkpoint) at fine-tune
seed 0, 1 = its worst, per preference. Rules:

* ``single-best-recipe``: the (mask, steps) with the lowest mean regret over the training tasks;
* ``best-mask@150``: the best mask at the fixed 150-step length (today's recipe);
* ``ones@tuned-steps``: every attention group, for the length best on the training tasks;
* ``full@tuned-steps``: every parameter (MemControl's baseline), likewise (its regret may be below
  0: the scale is the masks of groups a controller can deliver);
* ``early-stop``: the single best recipe's mask, stopped once the held-out loss has not improved
  for ``patience`` checkpoints (the checkpoint of its minimum delivered; patience tuned);
* ``membership-stop``: the same mask, stopped at the last checkpoint before the training images'
  membership AUC reaches a threshold (tuned);
* ``portfolio``: a greedy portfolio of recipes, judged by its best of the first n (n fine-tunes).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
from memrl.agents.ppo import build_ppo
from memrl.envs.control import ControlEnv

from memrl.config import Config, RewardConfig
from memrl.curves import FULL, CurveTable
from memrl.errors import MemrlError
from memrl.tables import REFERENCE_STEPS

__all__ = [
    "CONTROLLER_VARIANTS",
    "PATIENCES",
    "THRESHOLDS",
    "controller_rows",
    "curve_folds",
    "recipe_regret",
    "recipe_rows",
    "recipes_report",
]

PATIENCES = (1, 2, 3, 4)
"""Early stopping's patience grid (checkpoints without a held-out loss improvement)."""
THRESHOLDS = (0.52, 0.55, 0.6, 0.65, 0.7, 0.8)
"""The membership-AUC thresholds the membership stop is tuned over."""
PREFERENCES = (0.25, 0.5, 0.75)


def recipe_regret(table: CurveTable, reward: RewardConfig, t: int, w: float) -> np.ndarray:
    """(masks, checkpoints) regret of every stored recipe of task ``t`` at seed 0, scaled over
    the recipes a controller can deliver (masks of groups): full fine-tuning (every parameter)
    is on the same scale and may score below 0 (better than every mask)."""
    r = table.rewards(reward, t, w)[:, 0, :]
    groups = r[[i for i, m in enumerate(table.masks) if m != FULL]]
    best, worst = np.nanmax(groups), np.nanmin(groups)
    return (best - r) / max(best - worst, 1e-9)


def curve_folds(table: CurveTable) -> list[tuple[int, list[int], str]]:
    """(test task, training tasks, split) over the tasks with complete curves: leave one training
    task out, and each held-out task against every training task."""
    done = np.flatnonzero(table.complete())
    train = [int(t) for t in done if not table.heldout[t]]
    out = [(t, [u for u in train if u != t], "leave one task out") for t in train]
    out += [(int(t), train, "held out") for t in done if table.heldout[t]]
    return [(t, tr, split) for t, tr, split in out if tr]


def _stop_early(loss: np.ndarray, patience: int) -> int:
    best = 0
    for c in range(1, len(loss)):
        if loss[c] < loss[best]:
            best = c
        elif c - best >= patience:
            return best
    return best


def _stop_membership(auc: np.ndarray, threshold: float) -> int:
    crossed = np.flatnonzero(np.nan_to_num(auc, nan=0.0) >= threshold)
    return max(int(crossed[0]) - 1, 0) if len(crossed) else len(auc) - 1


def _tuned(values: dict[Any, list[float]]) -> Any:
    """The setting of lowest mean regret (ties: the first)."""
    return min(values, key=lambda k: (float(np.mean(values[k])), list(values).index(k)))


def recipe_rows(table: CurveTable, reward: RewardConfig) -> list[dict[str, Any]]:
    """Every rule's regret on every fold, preference and number of fine-tunes (portfolio: 1-4)."""
    masks = [i for i, m in enumerate(table.masks) if m != FULL]
    ones = table.masks.index("1" * len(table.masks[0]))
    at150 = np.flatnonzero(table.steps == REFERENCE_STEPS)
    loss, auc = table.values["heldout_loss"][:, :, 0, :], table.values["mia_auc_private"][:, :, 0, :]
    folds = curve_folds(table)
    if not folds:
        raise MemrlError(
            f"the curve tables complete {int(table.complete().sum())} task(s) of {len(table.names)}; the "
            "rules are fixed on training tasks and judged on others: continue the build (python -m "
            "memrl.tables build --config ...)"
        )
    rows = []
    for (test, train, split), w in itertools.product(folds, PREFERENCES):
        regret = {t: recipe_regret(table, reward, t, w) for t in [test, *train]}
        mean = np.nanmean([regret[t] for t in train], axis=0)  # (masks, checkpoints)
        mean[[i for i in range(len(table.masks)) if i not in masks]] = np.nan  # FULL is not a mask
        m, c = np.unravel_index(int(np.nanargmin(mean)), mean.shape)
        picks: dict[str, list[tuple[int, int]]] = {"single-best-recipe": [(int(m), int(c))]}
        if len(at150):
            best150 = int(np.nanargmin(mean[:, int(at150[0])]))
            picks["best-mask@150"] = [(best150, int(at150[0]))]
        picks["ones@tuned-steps"] = [(ones, int(np.nanargmin(mean[ones])))]
        full = table.masks.index(FULL)
        full_mean = np.nanmean([regret[t][full] for t in train], axis=0)
        picks["full@tuned-steps"] = [(full, int(np.nanargmin(full_mean)))]
        patience = _tuned({p: [regret[t][m, _stop_early(loss[t, m], p)] for t in train] for p in PATIENCES})
        picks["early-stop"] = [(int(m), _stop_early(loss[test, m], patience))]
        threshold = _tuned(
            {th: [regret[t][m, _stop_membership(auc[t, m], th)] for t in train] for th in THRESHOLDS}
        )
        picks["membership-stop"] = [(int(m), _stop_membership(auc[test, m], threshold))]
        chosen: list[tuple[int, int]] = []
        best = np.full(len(train), np.inf)
        stacked = np.stack([regret[t] for t in train])  # (train, masks, checkpoints)
        stacked[:, [i for i in range(len(table.masks)) if i not in masks]] = np.nan
        for _ in range(4):
            with warnings.catch_warnings():  # FULL's rows are all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                gain = np.nanmean(np.minimum(best[:, None, None], stacked), axis=0)
            for mc in chosen:
                gain[mc] = np.nan
            pick = np.unravel_index(int(np.nanargmin(gain)), gain.shape)
            chosen.append((int(pick[0]), int(pick[1])))
            best = np.minimum(best, stacked[:, pick[0], pick[1]])
        picks["portfolio"] = chosen
        for method, recipes in picks.items():
            for n in range(1, len(recipes) + 1):
                values = [regret[test][mc] for mc in recipes[:n]]
                rows.append(
                    {
                        "method": method,
                        "task": table.names[test],
                        "split": split,
                        "memorization_weight": w,
                        "fine_tunes": n,
                        "regret": float(np.nanmin(values)),
                        "recipe": f"{table.masks[recipes[0][0]]}@{int(table.steps[recipes[0][1]])}",
                        "seed": 0,  # the rules are deterministic
                    }
                )
    return rows


def recipes_report(rows: list[dict[str, Any]]) -> str:
    """Markdown: per split, each rule's mean, IQM and worst-task regret (over tasks and the three
    preferences) at each number of fine-tunes."""
    from research.benchmark.stats import iqm

    out = [
        "| split | rule | fine-tunes | mean regret | IQM | worst task | tasks |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["split"], r["method"], r["fine_tunes"]) for r in rows})
    for split, method, n in keys:
        picked = [r for r in rows if (r["split"], r["method"], r["fine_tunes"]) == (split, method, n)]
        values = np.array([r["regret"] for r in picked])
        by_task = {
            t: np.mean([r["regret"] for r in picked if r["task"] == t]) for t in {r["task"] for r in picked}
        }
        out.append(
            f"| {split} | {method} | {n} | {values.mean():.3f} | {iqm(values):.3f} | "
            f"{max(by_task.values()):.3f} | {len(by_task)} |"
        )
    return "\n".join(out) + "\n"


CONTROLLER_VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("controller", False, False),
    ("controller-no-signals", True, False),
    ("controller-no-descriptor", False, True),
)
"""The controller and its two ablations: (label, signals zeroed, descriptor zeroed), each trained
with what it observes."""


def controller_rows(cfg: Config, table: CurveTable, timesteps: int, seed: int = 0) -> list[dict[str, Any]]:
    """A controller trained by replay (PPO, ``timesteps`` steps, uniform preferences) on each fold's
    training tasks, run deterministically on its test task at every preference: the regret of the
    recipe it delivers, on the scale of :func:`recipe_regret`, with its two ablations."""
    train_cfg = cfg.with_changes(
        {"env.mode": "control", "env.backend": "replay", "env.preferences": "uniform", "seed": seed}
    )
    descriptors: dict[int, np.ndarray] = {}
    shared: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for test, train, split in curve_folds(table):
        shared.setdefault(tuple(train), []).append((test, split))
    rows = []
    for training, tests in shared.items():
        for label, no_signals, no_descriptor in CONTROLLER_VARIANTS:
            env = ControlEnv(train_cfg, curves=table, tasks=list(training), descriptors=descriptors)
            env.zero_signals, env.zero_descriptor = no_signals, no_descriptor
            model = build_ppo(train_cfg, env)
            model.learn(timesteps)
            judge = ControlEnv(train_cfg, curves=table, tasks=[t for t, _ in tests], descriptors=descriptors)
            judge.zero_signals, judge.zero_descriptor = no_signals, no_descriptor
            for (test, split), w in itertools.product(tests, PREFERENCES):
                obs, _ = judge.reset(seed=seed, options={"dataset": test, "preference": [w, 1.0 - w, 0.0]})
                done = False
                while not done:
                    action, _ = model.predict(obs, deterministic=True)
                    obs, _, done, _, info = judge.step(action)
                regret = recipe_regret(table, cfg.reward, test, w)[judge.mask_row, judge.checkpoint]
                rows.append(
                    {
                        "method": label,
                        "task": table.names[test],
                        "split": split,
                        "memorization_weight": w,
                        "fine_tunes": 1,
                        "regret": float(regret),
                        "recipe": f"{''.join(map(str, info['mask']))}@{info['delivered_steps']}",
                        "seed": seed,
                    }
                )
    return rows
