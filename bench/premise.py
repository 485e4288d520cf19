"""MemControl's premise on the curve tables: does choosing modules beat simply training less?

For every complete task of a curve suite and each preference (memorization weight 0.25 / 0.5 /
0.75), on rewards with the task's fixed 150-step references (:mod:`memrl.curves`), the best of

* (a) ``masks@150``: the curve table's masks at 150 steps (the fixed-length search of today),
* (b) ``ones@any``: the mask of ones (every attention group) stopped at any checkpoint,
* (c) ``full@any``: full fine-tuning (every parameter) stopped at any checkpoint,
* (d) ``any``: any (mask, steps) of the table,

their paired differences over tasks per split (95% intervals that resample tasks and, for the
methods stored with the noise seeds, the fine-tune seed of each task), and each task's Pareto front
of (memorization term, quality term) for (a), (b) and (d) with its hypervolume (reference point
(1.5, 1.5), both terms clipped to [0, 1.5]).

    python bench/premise.py --config bench3 --out docs/premise
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from memrl.config import load_config
from memrl.curves import FULL, CurveTable, load_curves
from memrl.reward import pareto_front
from memrl.tables import REFERENCE_STEPS

PREFERENCES = (0.25, 0.5, 0.75)
METHODS = ("masks@150", "ones@any", "full@any", "any")
REF_POINT = 1.5


def best_rewards(
    table: CurveTable, reward, t: int, w: float, seed: int, at: int = REFERENCE_STEPS
) -> dict[str, float]:
    """The best reward each method reaches on task ``t`` (NaN where the method has no stored
    point); the fixed-length search stops at ``at`` steps."""
    r = table.rewards(reward, t, w)[:, seed, :]  # (masks, checkpoints)
    c150 = int(np.flatnonzero(table.steps == at)[0])
    masks = [i for i, m in enumerate(table.masks) if m != FULL]
    ones = table.masks.index("1" * len(table.masks[0]))
    full = table.masks.index(FULL)

    def best(values: np.ndarray) -> float:
        return float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

    return {
        "masks@150": best(r[masks, c150]),
        "ones@any": best(r[ones]),
        "full@any": best(r[full]),
        "any": best(r),
    }


def hypervolume(points: np.ndarray) -> float:
    """Area dominated by ``points`` (both coordinates minimised) up to (REF_POINT, REF_POINT)."""
    pts = np.clip(points[np.isfinite(points).all(axis=1)], 0, REF_POINT)
    if not len(pts):
        return 0.0
    front = pts[pareto_front(pts)]
    front = front[np.argsort(front[:, 0])]
    area, last_y = 0.0, REF_POINT
    for x, y in front:
        area += (REF_POINT - x) * (last_y - y)
        last_y = y
    return float(area)


def paired_interval(diffs: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``diffs`` (tasks, seeds; NaN where a seed is missing) and its 95% interval, resampling
    tasks and, within each task, one of its stored seeds."""
    rng = np.random.default_rng(seed)
    tasks = np.flatnonzero(np.isfinite(diffs).any(axis=1))
    if not len(tasks):
        return np.nan, np.nan, np.nan
    means = []
    for _ in range(n_boot):
        draw = rng.choice(tasks, len(tasks))
        values = [rng.choice(diffs[t][np.isfinite(diffs[t])]) for t in draw]
        means.append(np.mean(values))
    point = float(np.mean([np.nanmean(diffs[t]) for t in tasks]))
    return point, float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="bench3")
    parser.add_argument("--out", type=Path, default=Path("docs/premise"))
    args = parser.parse_args()
    cfg = load_config(args.config, {"env.backend": "replay"})
    table = load_curves(cfg)
    complete = np.flatnonzero(table.complete())
    print(f"{len(complete)} of {len(table.names)} tasks complete")
    splits = {
        "training": [t for t in complete if not table.heldout[t]],
        "held out": [t for t in complete if table.heldout[t]],
    }
    lines = [
        "| split | preference | method | mean best reward | paired difference to masks@150 [95%] |",
        "|---|---|---|---|---|",
    ]
    for split, tasks in splits.items():
        if not tasks:
            continue
        for w in PREFERENCES:
            best = np.array(
                [
                    [
                        [best_rewards(table, cfg.reward, t, w, s)[m] for s in range(len(table.seeds))]
                        for m in METHODS
                    ]
                    for t in tasks
                ]
            )  # (tasks, methods, seeds)
            for i, method in enumerate(METHODS):
                diff = best[:, i, :] - best[:, 0, :1]  # against seed 0's fixed-length search
                mean, lo, hi = paired_interval(diff)
                seed0 = np.nanmean(best[:, i, 0])
                interval = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                lines.append(f"| {split} | {w} | {method} | {seed0:.3f} | {interval} |")
    hv = ["| task | HV masks@150 | HV ones@any | HV any |", "|---|---|---|---|"]
    for t in complete:
        terms = table.terms(cfg.reward, t)[:, 0]  # (masks, checkpoints, 2)
        c150 = int(np.flatnonzero(table.steps == REFERENCE_STEPS)[0])
        ones = table.masks.index("1" * len(table.masks[0]))
        hv.append(
            f"| {table.names[t]} | {hypervolume(terms[:-1, c150]):.3f} | {hypervolume(terms[ones]):.3f} | "
            f"{hypervolume(terms.reshape(-1, 2)):.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(["# The premise: fewer modules or fewer steps?", "", *lines, "", *hv, ""])
    (args.out / "premise.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
