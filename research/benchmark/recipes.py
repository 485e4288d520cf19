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
* ``steps-regression``: the single best recipe's mask, for a length predicted from the dataset's
  size and duplication (descriptor) and the preference, fitted on the training tasks' best lengths;
* ``early-stop``, ``early-stop-ones``: the single best recipe's mask (or every group), stopped once
  the held-out loss has not improved for ``patience`` checkpoints (its minimum delivered; tuned);
* ``membership-stop``, ``membership-stop-ones``: likewise, stopped at the last checkpoint before
  the training images' membership AUC reaches a threshold (tuned);
* ``portfolio``: a greedy portfolio of recipes, judged by its best of the first n (n fine-tunes);
* ``gp-prior``: Bayesian optimisation over masks whose prior mean is the training tasks' regret;
  each fine-tune reveals the mask's whole curve and the best checkpoint seen is delivered.

Intervals (:func:`bootstrap_means`) resample the tasks and the fine-tune noise together: every
delivered curve is replaced by another seed's (the masks stored with seeds 1 and 2 use their own;
the others take a deviation drawn from those masks' seed-to-seed differences on the same task).
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from memrl.agents.ppo import build_ppo
from memrl.envs.control import ControlEnv

from memrl.config import Config, RewardConfig
from memrl.curves import FULL, CurveTable
from memrl.descriptor import FAMILIES
from memrl.errors import MemrlError
from memrl.gp import calibrated_posterior, expected_improvement
from memrl.tables import REFERENCE_STEPS
from memrl.utils import stable_hash
from research.benchmark.stats import grouped, iqm, mean_regret

__all__ = [
    "CONTROLLER_SPLITS",
    "CONTROLLER_VARIANTS",
    "ENTROPY_GRID",
    "SPLITS",
    "PATIENCES",
    "THRESHOLDS",
    "bootstrap_means",
    "controller_rows",
    "curve_folds",
    "recipe_regret",
    "recipe_rows",
    "recipes_report",
    "regret_array",
    "regret_scale",
    "rerun",
    "summary_lines",
    "table_descriptors",
    "tune_controller",
    "tuned_entropy",
    "tuning_lines",
]

PATIENCES = (1, 2, 3, 4)
"""Early stopping's patience grid (checkpoints without a held-out loss improvement)."""
THRESHOLDS = (0.52, 0.55, 0.6, 0.65, 0.7, 0.8)
"""The membership-AUC thresholds the membership stop is tuned over."""
log = logging.getLogger(__name__)
PREFERENCES = (0.25, 0.5, 0.75)
SPLITS = ("leave one task out", "leave one source out", "held out")
"""The splits of :func:`curve_folds`."""
BUDGET = 4
"""Fine-tunes of the searching rules (portfolio, gp-prior)."""
PROTOCOL = [FAMILIES["protocol"].index(name) for name in ("log_size", "log_duplication")]
"""The descriptor entries ``steps-regression`` reads (what a user knows of the data)."""


def regret_array(table: CurveTable, reward: RewardConfig, t: int, w: float) -> np.ndarray:
    """(masks, seeds, checkpoints) regret of every stored recipe of task ``t``, scaled over the
    recipes a controller can deliver at seed 0 (masks of groups): full fine-tuning (every
    parameter) is on the same scale and may score below 0 (better than every mask)."""
    best, worst = regret_scale(table, reward, t, w)
    return (best - table.rewards(reward, t, w)) / max(best - worst, 1e-9)


def regret_scale(table: CurveTable, reward: RewardConfig, t: int, w: float) -> tuple[float, float]:
    """The best and the worst reward of task ``t``'s masks of groups at seed 0: regret 0 and 1."""
    r = table.rewards(reward, t, w)
    groups = r[[i for i, m in enumerate(table.masks) if m != FULL], 0, :]
    return float(np.nanmax(groups)), float(np.nanmin(groups))


def recipe_regret(table: CurveTable, reward: RewardConfig, t: int, w: float) -> np.ndarray:
    """(masks, checkpoints) regret of every stored recipe of task ``t`` at seed 0
    (:func:`regret_array`)."""
    return regret_array(table, reward, t, w)[:, 0, :]


def curve_folds(table: CurveTable) -> list[tuple[int, list[int], str]]:
    """(test task, training tasks, split) over the tasks with complete curves: leave one training
    task out, leave one training source out (every task of the source), and each held-out task
    against every training task."""
    done = np.flatnonzero(table.complete())
    train = [int(t) for t in done if not table.heldout[t]]
    sources = table.sources or table.names
    loto, loso, heldout = SPLITS
    out = [(t, [u for u in train if u != t], loto) for t in train]
    for source in dict.fromkeys(sources[t] for t in train):
        rest = [u for u in train if sources[u] != source]
        out += [(t, rest, loso) for t in train if sources[t] == source]
    out += [(int(t), train, heldout) for t in done if table.heldout[t]]
    return [(t, tr, split) for t, tr, split in out if tr]


def table_descriptors(cfg: Config, table: CurveTable) -> np.ndarray:
    """(tasks, descriptor) of every task with complete curves (NaN rows for the others): what the
    controller observes and ``steps-regression`` reads."""
    env = ControlEnv(cfg.with_changes({"env.mode": "control", "env.backend": "replay"}), curves=table)
    complete = table.complete()
    width = len(env.descriptor(int(np.flatnonzero(complete)[0])))
    return np.stack(
        [env.descriptor(t) if complete[t] else np.full(width, np.nan) for t in range(len(table.names))]
    )


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


def _steps_regression(
    features: np.ndarray, best_steps: np.ndarray, query: np.ndarray, steps: np.ndarray
) -> int:
    """The checkpoint nearest the length a ridge regression of log(steps) on ``features`` (rows:
    training task x preference) predicts for ``query``."""
    design = np.column_stack([np.ones(len(features)), features])
    ridge = 1e-2 * np.eye(design.shape[1])
    ridge[0, 0] = 0.0
    coef = np.linalg.solve(design.T @ design + ridge, design.T @ np.log(best_steps))
    predicted = float(np.exp(np.concatenate([[1.0], query]) @ coef))
    return int(np.argmin(np.abs(np.log(steps) - np.log(predicted))))


def _gp_prior(prior: np.ndarray, test: np.ndarray, bits: np.ndarray, budget: int) -> list[int]:
    """Masks tried in order by Bayesian optimisation: the lowest ``prior`` regret first, then the
    largest expected improvement of :func:`memrl.gp.calibrated_posterior` given ``test`` regrets
    seen so far (each fine-tune reveals its mask's best checkpoint)."""
    tried = [int(np.argmin(prior))]
    while len(tried) < min(budget, len(prior)):
        values = -test[tried]
        mean, std, _ = calibrated_posterior(prior, tried, values, bits)
        score = expected_improvement(mean, std, float(values.max()))
        score[tried] = -np.inf
        tried.append(int(np.argmax(score)))
    return tried


def recipe_rows(
    table: CurveTable, reward: RewardConfig, descriptors: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Every rule's regret on every fold, preference and number of fine-tunes (portfolio and
    gp-prior: 1 to :data:`BUDGET`). ``descriptors`` (:func:`table_descriptors`) enable
    ``steps-regression``."""
    masks = [i for i, m in enumerate(table.masks) if m != FULL]
    bits = np.array([[int(c) for c in table.masks[i]] for i in masks], dtype=float)
    ones = table.masks.index("1" * len(table.masks[0]))
    full = table.masks.index(FULL)
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
        stacked = np.stack([regret[t] for t in train])  # (train, masks, checkpoints)
        stacked[:, full] = np.nan  # FULL is not a mask of groups
        with warnings.catch_warnings():  # FULL's rows are all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stacked, axis=0)
        m, c = (int(i) for i in np.unravel_index(int(np.nanargmin(mean)), mean.shape))
        picks: dict[str, list[tuple[int, int]]] = {"single-best-recipe": [(m, c)]}
        if len(at150):
            picks["best-mask@150"] = [(int(np.nanargmin(mean[:, int(at150[0])])), int(at150[0]))]
        picks["ones@tuned-steps"] = [(ones, int(np.nanargmin(mean[ones])))]
        full_mean = np.nanmean([regret[t][full] for t in train], axis=0)
        picks["full@tuned-steps"] = [(full, int(np.nanargmin(full_mean)))]
        if descriptors is not None:
            best = np.array([table.steps[int(np.nanargmin(regret[t][m]))] for t in train], dtype=float)
            features = np.column_stack([descriptors[train][:, PROTOCOL], np.full(len(train), w)])
            query = np.concatenate([descriptors[test, PROTOCOL], [w]])
            picks["steps-regression"] = [(m, _steps_regression(features, best, query, table.steps))]
        for label, mask in (("", m), ("-ones", ones)):
            patience = _tuned(
                {p: [regret[t][mask, _stop_early(loss[t, mask], p)] for t in train] for p in PATIENCES}
            )
            picks[f"early-stop{label}"] = [(mask, _stop_early(loss[test, mask], patience))]
            threshold = _tuned(
                {
                    th: [regret[t][mask, _stop_membership(auc[t, mask], th)] for t in train]
                    for th in THRESHOLDS
                }
            )
            picks[f"membership-stop{label}"] = [(mask, _stop_membership(auc[test, mask], threshold))]
        chosen: list[tuple[int, int]] = []
        best_so_far = np.full(len(train), np.inf)
        for _ in range(BUDGET):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                gain = np.nanmean(np.minimum(best_so_far[:, None, None], stacked), axis=0)
            for mc in chosen:
                gain[mc] = np.nan
            pick = tuple(int(i) for i in np.unravel_index(int(np.nanargmin(gain)), gain.shape))
            chosen.append((pick[0], pick[1]))
            best_so_far = np.minimum(best_so_far, stacked[:, pick[0], pick[1]])
        picks["portfolio"] = chosen
        curve_best = np.nanmin(stacked[:, masks], axis=2)  # (train, masks): each curve's best point
        test_best = np.nanmin(regret[test][masks], axis=1)
        tried = _gp_prior(np.nanmean(curve_best, axis=0), test_best, bits, BUDGET)
        picks["gp-prior"] = [(masks[i], int(np.nanargmin(regret[test][masks[i]]))) for i in tried]
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
                        "picks": " ".join(f"{mm}:{cc}" for mm, cc in recipes[:n]),
                        "seed": 0,  # the rules are deterministic
                    }
                )
    return rows


def _picks(row: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (p.split(":") for p in str(row["picks"]).split())]


def bootstrap_means(
    rows: list[dict[str, Any]], table: CurveTable, reward: RewardConfig, n_boot: int = 1000, seed: int = 0
) -> dict[tuple[str, str, int], np.ndarray]:
    """(split, method, fine-tunes) -> ``n_boot`` draws of the mean regret, resampling the split's
    tasks (the same draw for every method: differences are paired) and the fine-tune noise (each
    delivered curve replaced by another seed's: a mask stored with every seed draws one of its own,
    any other adds a deviation drawn from those masks' seed-to-seed differences on the task, or on
    every task with noise rows where this one has none yet; full fine-tuning draws from its own
    seeds' differences likewise; one draw per (task, preference, recipe), shared by the methods that
    deliver the same recipe). A row's value is the best of its picks; rows of several seeds (a
    controller's) are averaged."""
    rng = np.random.default_rng(seed)
    full_row = table.masks.index(FULL) if FULL in table.masks else -1
    pairs = sorted({(table.names.index(r["task"]), r["memorization_weight"]) for r in rows})
    arrays = {(t, w): regret_array(table, reward, t, w) for t, w in pairs}  # (masks, seeds, checkpoints)

    def deviations(t: int, w: float, kind: str) -> np.ndarray:
        """(n, checkpoints) seed-to-seed differences of task ``t``'s masks of groups or full."""
        full = arrays.get((t, w))
        if full is None:
            full = arrays[(t, w)] = regret_array(table, reward, t, w)
        rows_of = [m for m in range(len(table.masks)) if (m == full_row) == (kind == FULL)]
        seeded = [m for m in rows_of if not np.isnan(full[m]).any()]
        return (full[seeded] - full[seeded, :1]).reshape(-1, len(table.steps))

    complete = [int(t) for t in np.flatnonzero(table.complete())]
    noisy: dict[tuple[int, float], np.ndarray] = {}
    pooled: dict[tuple[float, str], np.ndarray] = {}
    for t, w in pairs:
        full = arrays[(t, w)]
        draws = np.repeat(full[None, :, 0, :], n_boot, axis=0)  # (boot, masks, checkpoints)
        for kind in ("groups", FULL):
            own = deviations(t, w, kind)
            if not len(own) and (w, kind) not in pooled:  # computed once per preference and kind
                pooled[(w, kind)] = np.concatenate([deviations(u, w, kind) for u in complete] or [own])
            pool = own if len(own) else pooled[(w, kind)]
            if not len(pool):
                continue
            targets = [m for m in range(len(table.masks)) if (m == full_row) == (kind == FULL)]
            seeded = [m for m in targets if not np.isnan(full[m]).any()]
            if seeded:  # their own seeds
                pick = rng.integers(len(table.seeds), size=(n_boot, len(seeded)))
                draws[:, seeded] = full[seeded][np.arange(len(seeded))[None, :], pick]
            others = [m for m in targets if m not in seeded]
            draws[:, others] += pool[rng.integers(len(pool), size=(n_boot, len(others)))]
        noisy[(t, w)] = draws
    out: dict[tuple[str, str, int], np.ndarray] = {}
    for split, in_split in grouped(rows, lambda r: r["split"]).items():
        tasks = sorted({r["task"] for r in in_split})
        sample = rng.integers(len(tasks), size=(n_boot, len(tasks)))
        for (method, n), group in grouped(in_split, lambda r: (r["method"], r["fine_tunes"])).items():
            per_task = np.full((n_boot, len(tasks)), np.nan)
            for i, task in enumerate(tasks):
                mine = [r for r in group if r["task"] == task]
                if not mine:
                    continue
                t = table.names.index(task)
                values = [
                    np.min([noisy[(t, r["memorization_weight"])][:, m, c] for m, c in _picks(r)], axis=0)
                    for r in mine
                ]
                per_task[:, i] = np.mean(values, axis=0)
            out[(split, method, n)] = np.nanmean(np.take_along_axis(per_task, sample, axis=1), axis=1)
    return out


def noise_line(table: CurveTable) -> str:
    """What the re-run intervals resample: how many complete tasks have noise-seed rows
    (:func:`bootstrap_means` borrows theirs for the others)."""
    done = [int(t) for t in np.flatnonzero(table.complete())]
    values = table.values["heldout_loss"]  # (tasks, masks, seeds, checkpoints)
    noisy = [t for t in done if (~np.isnan(values[t]).any(axis=(1, 2))).any()]
    if not noisy:
        return (
            "Fine-tune noise: no task has noise-seed rows yet, so the re-run intervals resample "
            "tasks (and a controller's PPO seeds) only."
        )
    return (
        f"Fine-tune noise: {len(noisy)} of {len(done)} tasks have noise-seed rows "
        f"({', '.join(table.names[t] for t in noisy)}); the others borrow their seed-to-seed differences."
    )


def rerun(draws: np.ndarray, signed: bool = False) -> str:
    """``mean [2.5%, 97.5%]`` of bootstrap draws (:func:`bootstrap_means`)."""
    lo, hi = np.percentile(draws, [2.5, 97.5])
    f = "+.3f" if signed else ".3f"
    return f"{np.mean(draws):{f}} [{lo:{f}}, {hi:{f}}]"


def summary_lines(
    rows: list[dict[str, Any]], draws: dict[tuple[str, str, int], np.ndarray], what: str = "rule"
) -> list[str]:
    """A Markdown table: per split, each ``what`` (method) and number of fine-tunes, the mean
    regret at seed 0 and re-run (:func:`bootstrap_means` draws), IQM, worst task, the mean per
    preference and the number of tasks."""
    out = [
        f"| split | {what} | fine-tunes | mean regret | re-run [95% interval] | IQM | worst task | "
        + " | ".join(f"w={w}" for w in PREFERENCES)
        + " | tasks |",
        "|---|---|---|---|---|---|---|" + "---|" * len(PREFERENCES) + "---|",
    ]
    for (split, method, n), picked in sorted(
        grouped(rows, lambda r: (r["split"], r["method"], r["fine_tunes"])).items()
    ):
        values = np.array([r["regret"] for r in picked])
        by_task = {
            t: np.mean([r["regret"] for r in g]) for t, g in grouped(picked, lambda r: r["task"]).items()
        }
        by_w = [np.mean([r["regret"] for r in picked if r["memorization_weight"] == w]) for w in PREFERENCES]
        again = rerun(draws[(split, method, n)])
        out.append(
            f"| {split} | {method} | {n} | {values.mean():.3f} | {again} | {iqm(values):.3f} | "
            f"{max(by_task.values()):.3f} | " + " | ".join(f"{v:.3f}" for v in by_w) + f" | {len(by_task)} |"
        )
    return out


def recipes_report(rows: list[dict[str, Any]], table: CurveTable, reward: RewardConfig) -> str:
    """Markdown: per split, each rule's mean regret with a 95% interval over tasks and fine-tune
    noise (:func:`bootstrap_means`), IQM, worst task and the mean per preference; then every rule's
    paired difference from the controller (or, without one, from the single best recipe)."""
    draws = bootstrap_means(rows, table, reward)
    out = summary_lines(rows, draws) + ["", noise_line(table)]
    reference = "controller" if any(r["method"] == "controller" for r in rows) else "single-best-recipe"
    out += [
        "",
        f"Paired differences, {reference} minus each rule (negative: {reference} is better): at seed 0, "
        "and re-run (the mean and 95% interval over resampled tasks and fine-tune seeds).",
        "",
        "| split | rule | fine-tunes | difference | re-run [95% interval] |",
        "|---|---|---|---|---|",
    ]
    for split, method, n in sorted(draws):
        if method == reference or (split, reference, 1) not in draws:
            continue
        diff = draws[(split, reference, 1)] - draws[(split, method, n)]
        observed = np.mean(
            [r["regret"] for r in rows if (r["split"], r["method"], r["fine_tunes"]) == (split, reference, 1)]
        ) - np.mean(
            [r["regret"] for r in rows if (r["split"], r["method"], r["fine_tunes"]) == (split, method, n)]
        )
        out.append(f"| {split} | {method} | {n} | {observed:+.3f} | {rerun(diff, signed=True)} |")
    return "\n".join(out) + "\n"


CONTROLLER_VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("controller", False, False),
    ("controller-no-signals", True, False),
    ("controller-no-descriptor", False, True),
)
"""The controller and its two ablations: (label, signals zeroed, descriptor zeroed), each trained
with what it observes."""


CONTROLLER_SPLITS = ("held out", "leave one source out")
"""The splits a controller is trained for by default (leave one task out trains one per training
task: pass it to ``splits`` when the time is there)."""


def controller_rows(
    cfg: Config,
    table: CurveTable,
    timesteps: int,
    seeds: tuple[int, ...] = (0,),
    splits: tuple[str, ...] = CONTROLLER_SPLITS,
    workers: int = 1,
    parts: Path | None = None,
    variants: tuple[tuple[str, bool, bool], ...] = CONTROLLER_VARIANTS,
) -> list[dict[str, Any]]:
    """A controller trained by replay (PPO, ``timesteps`` steps, uniform preferences) on each fold's
    training tasks (folds of ``splits``), run deterministically on its test task at every
    preference: the regret of the recipe it delivers, on the scale of :func:`recipe_regret`, with
    its ablations (``variants``). One PPO run per training set, variant and seed of ``seeds``, all
    in one pool of ``workers`` single-threaded processes; with ``parts``, each run's rows are kept
    there and an interrupted run resumes."""
    settings = [(cfg, seed) for seed in seeds]
    runs = _run_controllers(settings, table, timesteps, splits, variants, workers, parts)
    return [r for _, rows in runs for r in rows]


def _run_controllers(
    settings: list[tuple[Config, int]],
    table: CurveTable,
    timesteps: int,
    splits: tuple[str, ...],
    variants: tuple[tuple[str, bool, bool], ...],
    workers: int,
    parts: Path | None,
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Every PPO run of every (config, seed) of ``settings`` (:func:`_controller_work`) in one pool,
    so the workers stay busy: each run's rows with the index of its setting."""
    from research.benchmark.experiments import in_parallel

    work: list[tuple[Any, ...]] = []
    keys: list[str] = []
    owners: list[int] = []
    for i, (cfg, seed) in enumerate(settings):
        found, found_keys = _controller_work(cfg, table, timesteps, seed, splits, variants)
        work, keys, owners = work + found, keys + found_keys, owners + [i] * len(found)
    log.info("controllers: %d PPO runs of %d steps, %d workers", len(work), timesteps, workers)
    return list(zip(owners, in_parallel(_controller_run, work, workers, keys, parts), strict=True))


def _controller_work(
    cfg: Config,
    table: CurveTable,
    timesteps: int,
    seed: int,
    splits: tuple[str, ...],
    variants: tuple[tuple[str, bool, bool], ...],
) -> tuple[list[tuple[Any, ...]], list[str]]:
    """:func:`controller_rows`' PPO runs (arguments of :func:`_controller_run`) and their keys: one
    per training set of ``splits``' folds and variant."""
    from research.benchmark.experiments import RESULTS_VERSION

    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise MemrlError(f"--control-splits: unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    train_cfg = cfg.with_changes(
        {"env.mode": "control", "env.backend": "replay", "env.preferences": "uniform", "seed": seed}
    )
    shared: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for test, train, split in (f for f in curve_folds(table) if f[2] in splits):
        shared.setdefault(tuple(train), []).append((test, split))
    every = sorted({t for training, tests in shared.items() for t in (*training, *(u for u, _ in tests))})
    descriptors: dict[int, np.ndarray] = {}
    env = ControlEnv(train_cfg, curves=table, tasks=every, descriptors=descriptors)
    for t in every:  # computed once here, not in every worker
        env.descriptor(t)
    work = [
        (train_cfg, table, list(training), tests, variant, timesteps, seed, descriptors)
        for training, tests in shared.items()
        for variant in variants
    ]
    keys = [
        stable_hash(
            [
                "controller",
                train_cfg.hash(),
                table.digest([*training, *(t for t, _ in tests)]),
                tests,
                variant,
                timesteps,
                seed,
                RESULTS_VERSION,
            ]
        )
        for _, _, training, tests, variant, *_ in work
    ]
    return work, keys


def _controller_run(
    train_cfg: Config,
    table: CurveTable,
    training: list[int],
    tests: list[tuple[int, str]],
    variant: tuple[str, bool, bool],
    timesteps: int,
    seed: int,
    descriptors: dict[int, np.ndarray],
) -> list[dict[str, Any]]:
    """One controller (or ablation) trained on ``training`` and judged on ``tests``."""
    label, no_signals, no_descriptor = variant
    start = time.perf_counter()
    env = ControlEnv(train_cfg, curves=table, tasks=training, descriptors=descriptors)
    env.zero_signals, env.zero_descriptor = no_signals, no_descriptor
    model = build_ppo(train_cfg, env)
    model.learn(timesteps)
    log.info(
        "%s (seed %d): %d PPO steps on %d training tasks in %.0f s",
        label,
        seed,
        timesteps,
        len(training),
        time.perf_counter() - start,
    )
    judge = ControlEnv(train_cfg, curves=table, tasks=[t for t, _ in tests], descriptors=descriptors)
    judge.zero_signals, judge.zero_descriptor = no_signals, no_descriptor
    rows = []
    for (test, split), w in itertools.product(tests, PREFERENCES):
        obs, _ = judge.reset(seed=seed, options={"dataset": test, "preference": [w, 1.0 - w, 0.0]})
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, done, _, info = judge.step(action)
        regret = recipe_regret(table, train_cfg.reward, test, w)[judge.mask_row, judge.checkpoint]
        rows.append(
            {
                "method": label,
                "task": table.names[test],
                "split": split,
                "memorization_weight": w,
                "fine_tunes": 1,
                "regret": float(regret),
                "recipe": f"{''.join(map(str, info['mask']))}@{info['delivered_steps']}",
                "picks": f"{judge.mask_row}:{judge.checkpoint}",
                "seed": seed,
            }
        )
    return rows


ENTROPY_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
"""The PPO entropy coefficients ``tune --method controller`` tries. The controller's first action
picks a mask bit by bit, so moving between two single-group masks passes through worse ones; too
little entropy and PPO settles on one recipe for every task (measured: 0.01 on suite v3's 11
first training tasks delivers ``1000000``@25 everywhere, in-sample regret 0.084; 0.1 tells the
mix sources from the shifted ones, 0.025)."""


def tune_controller(
    cfg: Config,
    table: CurveTable,
    timesteps: int,
    seeds: int,
    workers: int = 1,
    parts: Path | None = None,
    grid: tuple[float, ...] = ENTROPY_GRID,
) -> list[dict[str, Any]]:
    """The controller's entropy coefficient chosen without a held-out task: for each of ``grid``,
    controllers trained leaving one *training* source out (:func:`controller_rows`, no ablations),
    each row with its ``ent_coef``."""
    if not any(split == "leave one source out" for *_, split in curve_folds(table)):
        raise MemrlError(
            "tune --method controller leaves one training source out: the curve table needs complete "
            "training tasks of two sources or more (python -m memrl.tables build --config ...)"
        )
    grid_seeds = list(itertools.product(grid, range(seeds)))
    settings = [(cfg.with_changes({"ppo.ent_coef": coef}), seed) for coef, seed in grid_seeds]
    runs = _run_controllers(
        settings, table, timesteps, ("leave one source out",), CONTROLLER_VARIANTS[:1], workers, parts
    )
    return [{**r, "ent_coef": grid_seeds[i][0]} for i, rows in runs for r in rows]


def tuned_entropy(rows: list[dict[str, Any]]) -> float:
    """The entropy coefficient with the lowest mean regret over ``rows`` (ties: the smaller)."""
    means = {c: round(mean_regret(v), 6) for c, v in grouped(rows, lambda r: r["ent_coef"]).items()}
    return min(means, key=lambda c: (means[c], c))


def tuning_lines(rows: list[dict[str, Any]]) -> str:
    """Markdown: each entropy coefficient's leave-one-source-out regret (mean, IQM, worst task, per
    preference, how many distinct recipes it delivered), the chosen one marked."""
    chosen = tuned_entropy(rows)
    out = [
        "| ent_coef | mean regret | IQM | worst task | w=0.25 | w=0.5 | w=0.75 | distinct recipes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for coef, mine in sorted(grouped(rows, lambda r: r["ent_coef"]).items()):
        tasks = grouped(mine, lambda r: r["task"]).values()
        by_w = grouped(mine, lambda r: r["memorization_weight"])
        mark = " (chosen)" if coef == chosen else ""
        regrets = np.array([r["regret"] for r in mine])
        out.append(
            f"| {coef:g}{mark} | {regrets.mean():.3f} | {iqm(regrets):.3f} | "
            f"{max(mean_regret(t) for t in tasks):.3f} | "
            + " | ".join(f"{mean_regret(by_w[w]):.3f}" for w in PREFERENCES)
            + f" | {len({r['recipe'] for r in mine})} |"
        )
    return "\n".join(out) + f"\n\nChosen: ppo.ent_coef {chosen:g} (leave one training source out).\n"
