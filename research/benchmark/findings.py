"""What the tables say before any method runs, and the MemControl paper's claims checked on them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config
from memrl.errors import MemrlError
from memrl.report import pyplot, save_figure
from memrl.searchers.basic import hand_presets
from research.benchmark.folds import PREFERENCES, SPLITS, load_table, mask_index, split_folds
from research.benchmark.methods import searched

__all__ = [
    "CLAIM_METRICS",
    "MEMORIZATION_CANDIDATES",
    "NOISE_METRICS",
    "claims",
    "claims_text",
    "descriptor_ablation",
    "findings",
    "memorization_metrics",
    "ranking_clusters",
]

NOISE_METRICS = (
    "canary_log_loss_ratio",
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

    from memrl.tables import NOISE_SEEDS
    from memrl.task import Task, make_evaluator, suite

    table = load_table(cfg)
    done = table.complete()
    if not done:
        raise MemrlError("no task of the suite has a complete table yet: python -m memrl.tables build")
    key = "".join
    out = [f"Complete tasks: {len(done)} of {len(table.names)}.", ""]
    for w in PREFERENCES:
        regret = table.regret(w)
        single = searched("single-best", table, done, done[0], w, 1)[0]  # the test task is not read
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
            *ranking_clusters(cfg, table),
            *descriptor_ablation(table),
        ]
    evaluator = make_evaluator(cfg)
    out += memorization_metrics(cfg, table, evaluator)
    lines = []
    for entry in suite(cfg):
        task = Task(entry.cfg, evaluator, entry.name, entry.heldout)
        found = [  # the noise masks stored with every seed
            runs
            for row in task.noise_sample().values()
            if len(runs := [ev for ev in row if ev is not None and ev.ok]) == len(row)
        ]
        if len(found) < 4:
            continue
        t = table.names.index(entry.name)
        every = [evaluator.lookup(task.context.spec(m).hash) for m in table.masks]
        for metric in NOISE_METRICS:
            per_mask = np.array([[ev.metrics[metric] for ev in row] for row in found])
            noise = float(np.mean(per_mask.std(axis=1, ddof=1)))
            spread = float(np.std([ev.metrics[metric] for ev in every if ev is not None], ddof=1))
            ratio = f"{noise / spread:.2f}" if spread > 0 else "-"
            lines.append(f"| {table.names[t]} | {metric} | {noise:.4f} | {spread:.4f} | {ratio} |")
    if lines:
        out += [
            f"Seed noise ({len(NOISE_SEEDS) + 1} fine-tune seeds x the noise sample's masks (8 or 16): the "
            "mean over masks of the "
            "standard deviation over seeds) against the spread across all 128 masks (seed 0):",
            "",
            "| task | metric | seed noise | spread across masks | noise / spread |",
            "|---|---|---|---|---|",
            *lines,
        ]
    return "\n".join(out)


MEMORIZATION_CANDIDATES = ("canary_log_loss_ratio", "canary_loss_gap")
"""Memorization metrics compared by :func:`memorization_metrics` (the reward's v3 and v2)."""


def memorization_metrics(cfg: Config, table: Any, evaluator: Any) -> list[str]:
    """Markdown lines: per complete task, for each of :data:`MEMORIZATION_CANDIDATES`, the share
    of fine-tuned masks that it says memorize more than the base model, and its rank correlation
    over the masks with the generated samples' similarity to their nearest training image
    (``nn_similarity_q95``, a measure from the samples, not the losses)."""
    from scipy.stats import spearmanr

    from memrl.task import Task, suite

    done = {table.names[t] for t in table.complete()}
    header = " | ".join(f"{m}: above base / Spearman" for m in MEMORIZATION_CANDIDATES)
    lines = [
        "Memorization metrics: share of the fine-tuned masks scored above no fine-tune, and Spearman "
        "over the masks against the samples' nearest-training similarity (q95):",
        "",
        f"| task | {header} |",
        "|---|" + "---|" * len(MEMORIZATION_CANDIDATES),
    ]
    for entry in suite(cfg):
        if entry.name not in done:
            continue
        task = Task(entry.cfg, evaluator, entry.name, entry.heldout)
        rows = [evaluator.lookup(task.context.spec(m).hash) for m in table.masks]
        metrics = [ev.metrics for ev in rows if ev is not None and ev.ok]
        if len(metrics) < len(rows):
            continue
        similarity = [m["nn_similarity_q95"] for m in metrics[1:]]
        cells = []
        for name in MEMORIZATION_CANDIDATES:
            values = np.array([m[name] for m in metrics])
            rho = spearmanr(values[1:], similarity)[0]
            cells.append(f"{np.mean(values[1:] > values[0]):.2f} / {rho:+.2f}")
        lines.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    return ["", *lines, ""]


def ranking_clusters(cfg: Config, table: Any) -> list[str]:
    """Markdown lines: how alike tasks rank the masks (Spearman of rewards at w=0.5) within a
    source, within a kind of image across sources, and across kinds."""
    from scipy.stats import spearmanr

    from memrl.data.bundled import SOURCES

    done = table.complete()
    source = dict(zip(table.names, table.sources))
    kind = {name: SOURCES[s].kind if s in SOURCES else "a folder" for name, s in source.items()}
    rewards = table.rewards(0.5)
    groups: dict[str, list[float]] = {"same source": [], "same kind, other source": [], "other kind": []}
    for a, b in itertools.combinations(done, 2):
        na, nb = table.names[a], table.names[b]
        key = (
            "same source"
            if source[na] == source[nb]
            else "same kind, other source"
            if kind[na] == kind[nb]
            else "other kind"
        )
        groups[key].append(float(spearmanr(rewards[a], rewards[b])[0]))
    cells = [f"{k}: {np.mean(v):.2f} ({len(v)} pairs)" for k, v in groups.items() if v]
    return [
        "Mean rank correlation of the masks' rewards (w=0.5) between tasks: " + "; ".join(cells) + ".",
        "",
    ]


def descriptor_ablation(table: Any) -> list[str]:
    """Markdown lines: how well each descriptor family predicts the best mask: the regret of the
    nearest training task's best mask (on each split; mean over preferences) with every family,
    and with each family removed."""
    from memrl.descriptor import family_slices

    k = table.masks.shape[1]
    variants = {"all families": None, **{f"without {f}": s for f, s in family_slices(k).items()}}
    lines = [
        "Nearest-task lookup (top-1) with each descriptor family removed: mean regret (how much a "
        "family helps predict the best mask):",
        "",
        "| descriptor | " + " | ".join(SPLITS) + " |",
        "|---|---|---|---|",
    ]
    splits: dict[str, list[tuple[int, list[int]]]] = {s: [] for s in SPLITS}
    for test, train, split in split_folds(table):
        splits[split].append((test, train))
    full = table.descriptors.copy()
    for label, cut in variants.items():
        table.descriptors = full.copy()
        if cut is not None:
            table.descriptors[:, cut] = 0.0
        cells = []
        for pairs in splits.values():
            v = [
                table.regret(w)[test, searched("nearest-task", table, train, test, w, 1)[0]]
                for test, train in pairs
                for w in PREFERENCES
            ]
            cells.append(f"{np.mean(v):.3f}" if v else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table.descriptors = full
    return [*lines, ""]


CLAIM_METRICS = ("near_copy_fraction", "canary_copy_fraction")


def claims(cfg: Config, path: Path) -> tuple[list[dict[str, Any]], str]:
    """Per complete task: memorization and quality of no fine-tune, full fine-tuning of every UNet
    parameter, the presets and the searched masks; which of them lie on the Pareto front
    (memorization metric and quality metric, both minimised). Writes the planes to ``path``."""
    plt = pyplot()

    from memrl.reward import pareto_front
    from memrl.task import Task, TaskContext, full_unet, make_evaluator, suite

    table = load_table(cfg)
    evaluator = make_evaluator(cfg)
    mem, qual = cfg.reward.memorization, cfg.reward.quality
    rows: list[dict[str, Any]] = []
    planes = []
    complete = table.complete()
    for t, entry in enumerate(suite(cfg)):
        if t not in complete:
            continue
        task = Task(entry.cfg, evaluator, entry.name, entry.heldout)
        whole = TaskContext.get(full_unet(entry.cfg))
        full = evaluator.lookup(whole.spec((1,) * whole.space.k).hash)
        looked_up = [evaluator.lookup(task.context.spec(m).hash) for m in table.masks]
        found = [ev for ev in looked_up if ev is not None]
        if len(found) < len(looked_up):
            continue
        points = np.array([[ev.metrics[mem], ev.metrics[qual]] for ev in found])
        named = {"no fine-tune": 0, **{n: mask_index(m) for n, m in hand_presets(task.space.names).items()}}
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
