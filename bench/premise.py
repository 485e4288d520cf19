"""MemControl's premise on the curve tables: does choosing modules beat simply training less?

For every complete task of a curve suite and each preference (memorization weight 0.25 / 0.5 /
0.75), on the task's fixed 150-step references (:mod:`memrl.curves`), the best recipe of each
family in hindsight (an oracle per family, chosen on fine-tune seed 0):

* (a) ``masks@150``: the curve table's masks at 150 steps (the fixed-length search of today),
* (b) ``ones@any``: the mask of ones (every attention group) stopped at any checkpoint,
* (c) ``full@any``: full fine-tuning (every parameter, MemControl's baseline) stopped at any checkpoint,
* (d) ``any``: any (mask of groups, steps) of the table,
* (e) ``masks@first``: the masks stopped at the first checkpoint (25 steps on bench3): ``any`` minus
  this is all a stopping decision can add once the mask is right.

Beside them, no fine-tune at all (the base model, the task's own reference) on the same scale: a
task where it scores below 0 is one where every recipe makes the model worse for every preference.

Regret on the recipes benchmark's scale (:func:`research.benchmark.recipes.regret_array`: 0 = the
task's best mask-of-groups point at seed 0, 1 = its worst; full fine-tuning may go below 0), means
per split with 95% intervals and paired differences that resample tasks and fine-tune noise
(:func:`research.benchmark.recipes.bootstrap_means`: the oracle's pick is re-run with another seed,
so a pick that won by luck on seed 0 pays for it). Each task's Pareto front of (memorization term,
quality term) for (a)-(e) with its hypervolume (reference point (1.5, 1.5), terms clipped to
[0, 1.5]). Plots: the fronts and the curves of a few tasks.

    python bench/premise.py --config bench3 --out docs/premise
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from memrl.cli import add_config_args, config_from_args
from memrl.config import dump_config
from memrl.curves import FULL, CurveTable, load_curves, preference_reward
from memrl.report import pyplot, save_figure
from memrl.reward import Reward, pareto_front
from memrl.tables import REFERENCE_STEPS
from memrl.utils import atomic_write_text, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: research/ is not installed
from research.benchmark.recipes import (  # noqa: E402
    PREFERENCES,
    bootstrap_means,
    noise_line,
    recipe_regret,
    regret_scale,
    rerun,
    summary_lines,
)

METHODS = ("masks@150", "ones@any", "full@any", "any", "masks@first")
REF_POINT = 1.5
SPLITS = {False: "training", True: "held out"}


def family_points(table: CurveTable, at: int = REFERENCE_STEPS) -> dict[str, list[tuple[int, int]]]:
    """Every (mask row, checkpoint) of each family (the fixed-length one stops at ``at`` steps)."""
    masks = [i for i, m in enumerate(table.masks) if m != FULL]
    c150 = int(np.flatnonzero(table.steps == at)[0])
    ones = table.masks.index("1" * len(table.masks[0]))
    full = table.masks.index(FULL)
    every = range(len(table.steps))
    return {
        "masks@150": [(m, c150) for m in masks],
        "ones@any": [(ones, c) for c in every],
        "full@any": [(full, c) for c in every],
        "any": [(m, c) for m in masks for c in every],
        "masks@first": [(m, 0) for m in masks],
    }


def premise_rows(table: CurveTable, reward: Any, at: int = REFERENCE_STEPS) -> list[dict[str, Any]]:
    """Each family's best recipe (lowest seed-0 regret) per complete task and preference."""
    families = family_points(table, at)
    rows = []
    for t in np.flatnonzero(table.complete()):
        for w in PREFERENCES:
            regret = recipe_regret(table, reward, int(t), w)
            for method, points in families.items():
                m, c = min(points, key=lambda p: regret[p])
                rows.append(
                    {
                        "method": method,
                        "task": table.names[t],
                        "split": SPLITS[bool(table.heldout[t])],
                        "memorization_weight": w,
                        "fine_tunes": 1,
                        "regret": float(regret[m, c]),
                        "recipe": f"{table.masks[m]}@{int(table.steps[c])}",
                        "picks": f"{m}:{c}",
                        "seed": 0,
                    }
                )
    return rows


def base_regret(table: CurveTable, reward: Any, t: int, w: float) -> float:
    """Regret of not fine-tuning task ``t`` (its base-model reference) on :func:`recipe_regret`'s
    scale; below 0 where the base model beats every stored recipe."""
    refs = table.references[t]
    assert refs is not None  # complete tasks have references
    terms = Reward(reward, refs).terms(refs.none)
    value = float(preference_reward(np.array([terms["memorization_term"], terms["quality_term"]]), w))
    best, worst = regret_scale(table, reward, t, w)
    return (best - value) / max(best - worst, 1e-9)


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


def family_terms(table: CurveTable, reward: Any, t: int) -> dict[str, np.ndarray]:
    """(points, 2) memorization and quality terms of each family's recipes on task ``t`` (seed 0)."""
    terms = table.terms(reward, t)[:, 0]  # (masks, checkpoints, 2)
    return {method: np.array([terms[p] for p in points]) for method, points in family_points(table).items()}


def report(table: CurveTable, reward: Any, rows: list[dict[str, Any]]) -> str:
    draws = bootstrap_means(rows, table, reward)
    out = summary_lines(rows, draws, what="family") + ["", noise_line(table)]
    out += [
        "",
        "Paired differences (first minus second; negative: the first is better), at seed 0 and re-run "
        "(each family's seed-0 pick fine-tuned again: mean and 95% interval over tasks and seeds).",
        "",
    ]
    out += ["| split | comparison | difference | re-run [95% interval] |", "|---|---|---|---|"]
    pairs = [
        ("ones@any", "masks@150"),
        ("full@any", "masks@150"),
        ("any", "masks@150"),
        ("any", "ones@any"),
        ("any", "masks@first"),
    ]
    for split in dict.fromkeys(r["split"] for r in rows):
        for a, b in pairs:
            diff = draws[(split, a, 1)] - draws[(split, b, 1)]
            observed = np.mean(
                [r["regret"] for r in rows if (r["split"], r["method"]) == (split, a)]
            ) - np.mean([r["regret"] for r in rows if (r["split"], r["method"]) == (split, b)])
            out.append(f"| {split} | {a} - {b} | {observed:+.3f} | {rerun(diff, signed=True)} |")
    out += [
        "",
        "No fine-tune at all (the base model): its regret on the same scale, and the tasks where it "
        "beats every stored recipe at every preference.",
        "",
        "| split | mean regret | w=0.25 | w=0.5 | w=0.75 | tasks where no fine-tune is best |",
        "|---|---|---|---|---|---|",
    ]
    done = [int(t) for t in np.flatnonzero(table.complete())]
    for split in dict.fromkeys(SPLITS[bool(table.heldout[t])] for t in done):
        tasks = [t for t in done if SPLITS[bool(table.heldout[t])] == split]
        base = np.array([[base_regret(table, reward, t, w) for w in PREFERENCES] for t in tasks])
        never = [table.names[t] for t, row in zip(tasks, base, strict=True) if (row < 0).all()]
        out.append(
            f"| {split} | {base.mean():.3f} | "
            + " | ".join(f"{v:.3f}" for v in base.mean(axis=0))
            + f" | {len(never)} of {len(tasks)}: {', '.join(never) or 'none'} |"
        )
    out += ["", "Hypervolume of each family's (memorization, quality) front per task (larger: better).", ""]
    out += ["| task | split | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for t in np.flatnonzero(table.complete()):
        hv = {m: hypervolume(p) for m, p in family_terms(table, reward, int(t)).items()}
        out.append(
            f"| {table.names[t]} | {SPLITS[bool(table.heldout[t])]} | "
            + " | ".join(f"{hv[m]:.3f}" for m in METHODS)
            + " |"
        )
    return "\n".join(out) + "\n"


def plot(table: CurveTable, reward: Any, out: Path, n_tasks: int = 6) -> list[Path]:
    """fronts.png (each family's points and front, per task) and curves.png (both terms against
    steps for the mask of ones, full fine-tuning and the best mask at 150 steps)."""
    plt = pyplot()
    tasks = [int(t) for t in np.flatnonzero(table.complete())][:n_tasks]
    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:red", "tab:grey", "tab:green"), strict=True))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for method, points in family_terms(table, reward, t).items():
            pts = points[np.isfinite(points).all(axis=1)]
            front = pts[pareto_front(pts)]
            front = front[np.argsort(front[:, 0])]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.3, color=colours[method])
            ax.plot(front[:, 0], front[:, 1], "-o", ms=3, color=colours[method], label=method)
        ax.set_title(table.names[t], fontsize=9)
        ax.set_xlabel("memorization term")
    axes[0, 0].set_ylabel("quality term (lower: better)")
    axes[0, 0].legend(fontsize=7)
    fronts = out / "fronts.png"
    save_figure(fig, fronts)
    plt.close(fig)
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.6), squeeze=False, sharex=True)
    c150 = int(np.flatnonzero(table.steps == REFERENCE_STEPS)[0])
    for col, t in enumerate(tasks):
        terms = table.terms(reward, t)[:, 0]  # (masks, checkpoints, 2)
        regret = recipe_regret(table, reward, t, 0.5)
        groups = [i for i, m in enumerate(table.masks) if m != FULL]
        best150 = min(groups, key=lambda m: regret[m, c150])
        shown = {
            "ones": table.masks.index("1" * len(table.masks[0])),
            "full": table.masks.index(FULL),
            f"{table.masks[best150]} (best@150)": best150,
        }
        for row, name in enumerate(("memorization term", "quality term")):
            ax = axes[row, col]
            for label, m in shown.items():
                ax.plot(table.steps, terms[m, :, row], label=label)
            ax.axvline(REFERENCE_STEPS, color="k", lw=0.5, ls=":")
            ax.set_ylabel(name if col == 0 else "")
        axes[0, col].set_title(table.names[t], fontsize=9)
        axes[1, col].set_xlabel("fine-tune steps")
    axes[0, 0].legend(fontsize=7)
    curves = out / "curves.png"
    save_figure(fig, curves)
    plt.close(fig)
    return [fronts, curves]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, default="bench3")
    parser.add_argument("--out", type=Path, default=Path("docs/premise"))
    args = parser.parse_args()
    cfg = config_from_args(args).with_changes({"env.backend": "replay"})
    table = load_curves(cfg)
    complete = np.flatnonzero(table.complete())
    print(f"{len(complete)} of {len(table.names)} tasks complete")
    rows = premise_rows(table, cfg.reward)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(table, cfg.reward, rows)
    plots = plot(table, cfg.reward, args.out)
    header = [
        "# The premise: fewer modules or fewer steps?",
        "",
        f"Generated by `python bench/premise.py` on {time.strftime('%Y-%m-%d')} from {len(complete)} of "
        f"{len(table.names)} tasks with complete curves ({', '.join(table.names[t] for t in complete)}); "
        f"config hash {cfg.hash()}. Plots: {', '.join(f'[{p.name}]({p.name})' for p in plots)}.",
        "",
    ]
    atomic_write_text(args.out / "premise.md", "\n".join(header) + text)
    record = {"config_hash": cfg.hash(), "versions": package_versions(), "rows": rows}
    atomic_write_text(args.out / "premise.json", json.dumps(record, indent=1))
    dump_config(cfg, args.out / "config.yaml")
    print("\n".join(header) + text)


if __name__ == "__main__":
    main()
