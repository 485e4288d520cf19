"""Summaries of the benchmark's rows: means, IQM and tails with task-level bootstrap intervals,
paired differences, hit rates, tables and plots.

rliable (Agarwal et al., NeurIPS 2021) was tried for these and left out: with the pinned stack
``import rliable`` fails inside its dependency ``arch`` 7.2.0 (``deprecate_kwarg() missing 1 required
positional argument``, a pandas 3 change), and its stratified bootstrap resamples runs within
tasks, while transfer is judged across tasks (:func:`task_bootstrap` resamples the tasks first).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memrl.report import pyplot, save_figure
from research.benchmark.folds import SPLITS, split_of

__all__ = [
    "HEADLINE_BUDGETS",
    "SEARCHER",
    "STARTING_POINT",
    "against_the_best",
    "bootstrap",
    "describe",
    "first_picks",
    "grouped",
    "headline",
    "iqm",
    "mean_regret",
    "paired_differences",
    "per_task",
    "plot_budgets",
    "plot_curves",
    "plot_transfer",
    "summarise",
    "summarise_nested",
    "summarise_tuning",
    "task_bootstrap",
    "write_rows",
]


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50%."""
    v = np.sort(values[np.isfinite(values)])
    lo, hi = int(np.floor(0.25 * len(v))), int(np.ceil(0.75 * len(v)))
    return float(v[lo:hi].mean()) if hi > lo else float(np.mean(v))


def bootstrap(
    values: np.ndarray, stat: Callable[[np.ndarray], float], n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat`` over independent ``values``."""
    rng = np.random.default_rng(seed)
    draws = [stat(rng.choice(values, len(values))) for _ in range(n)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def task_bootstrap(
    groups: dict[str, np.ndarray], stat: Callable[[np.ndarray], float], n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of ``stat`` by a two-level bootstrap: resample the tasks (the unit of
    generalisation in transfer), then the rows (seeds, preferences) within each drawn task.
    ``groups`` maps each task to its values. NaN when there are no tasks."""
    if not groups:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    flat = np.concatenate(list(groups.values()))
    sizes = np.array([len(v) for v in groups.values()])
    starts = np.cumsum(sizes) - sizes
    draws = []
    for _ in range(n):  # one index array per draw: rows of the drawn tasks, drawn within each
        picked = rng.integers(len(sizes), size=len(sizes))
        size = np.repeat(sizes[picked], sizes[picked])
        start = np.repeat(starts[picked], sizes[picked])
        draws.append(stat(flat[start + rng.integers(size)]))
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def grouped(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
) -> dict[Any, list[dict[str, Any]]]:
    """``rows`` by ``key(row)``, in the order the keys first appear."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def mean_regret(rows: list[dict[str, Any]]) -> float:
    return float(np.mean([r["regret"] for r in rows]))


def _by_task(rows: list[dict[str, Any]], key: str = "regret") -> dict[str, np.ndarray]:
    return {t: np.array([float(r[key]) for r in g]) for t, g in grouped(rows, lambda r: r["task"]).items()}


def paired_differences(rows: list[dict[str, Any]], method: str, reference: str) -> list[dict[str, Any]]:
    """``method``'s regret minus ``reference``'s on the same task, preference, seed and number of
    fine-tunes (negative: ``method`` is better), as rows with a ``regret`` field."""
    ref = {
        (r["task"], r["memorization_weight"], r["seed"], r["fine_tunes"]): r["regret"]
        for r in rows
        if r["method"] == reference
    }
    out = []
    for r in rows:
        key = (r["task"], r["memorization_weight"], r["seed"], r["fine_tunes"])
        if r["method"] == method and key in ref:
            out.append({**r, "regret": r["regret"] - ref[key]})
    return out


def describe(rows: list[dict[str, Any]], reference: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Mean regret with a task-level 95% interval, IQM, the share of rows above 0.2, the worst row,
    the hit rate (regret within the task's noise floor; rows whose task has none are left out) and
    the number of tasks. With ``reference`` (the paired differences to another method), also the
    mean difference and its task-level interval."""
    v = np.array([r["regret"] for r in rows], dtype=float)
    floors = np.array([r.get("noise_floor", np.nan) for r in rows], dtype=float)
    known = np.isfinite(floors)
    lo, hi = task_bootstrap(_by_task(rows), np.mean)
    out = {
        "tasks": float(len({r["task"] for r in rows})),
        "mean": float(np.mean(v)),
        "lo": lo,
        "hi": hi,
        "iqm": iqm(v),
        "above_0.2": float(np.mean(v > 0.2)),
        "worst": float(np.max(v)),
        "hits": float(np.mean(v[known] <= floors[known] + 1e-12)) if known.any() else float("nan"),
    }
    if reference:
        d = np.array([r["regret"] for r in reference])
        d_lo, d_hi = task_bootstrap(_by_task(reference), np.mean)
        out.update(diff=float(np.mean(d)), diff_lo=d_lo, diff_hi=d_hi)
    return out


HEADLINE_BUDGETS = (1, 2, 4, 8, 16)
"""The numbers of fine-tunes the headline table reports (the budgets issue 20 judges)."""


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: every method's mean regret after each of :data:`HEADLINE_BUDGETS` fine-tunes
    it was judged at, all preferences pooled, one column per split: the table on README's front
    page."""
    at = grouped(
        [r for r in rows if r["fine_tunes"] in HEADLINE_BUDGETS],
        lambda r: (r["method"], split_of(r), r["fine_tunes"]),
    )
    labels = [label for label in SPLITS if any(key[1] == label for key in at)]
    out = [
        f"**Mean regret after {' / '.join(map(str, HEADLINE_BUDGETS))} fine-tunes, all preferences pooled**",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [
            " / ".join(f"{mean_regret(at[m, label, n]):.3f}" for n in HEADLINE_BUDGETS if (m, label, n) in at)
            for label in labels
        ]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def summarise(rows: list[dict[str, Any]], reference: str = "ppo") -> str:
    """Markdown: for each split and preference (and all preferences pooled), every method's
    zero-shot regret (1 fine-tune): mean [task-level 95% interval], IQM, share of rows above 0.2,
    worst row, hit rate, paired difference to ``reference`` [interval] and gap closed (the share of
    the single-best-to-optimum gap closed, from means); then each method's mean regret at every
    number of fine-tunes, per split. The :func:`headline` and :func:`first_picks` tables come
    first."""
    out = []
    pooled: dict[tuple[str, str], dict[str, float]] = {}  # (split, method): its 1-fine-tune description
    methods = list(dict.fromkeys(r["method"] for r in rows))
    weights = sorted({r["memorization_weight"] for r in rows})
    for label in SPLITS:
        split = [r for r in rows if split_of(r) == label]
        if not split:
            continue
        tasks = sorted({r["task"] for r in split})
        out += [f"### {label.capitalize()} ({len(tasks)} tasks: {', '.join(tasks)})", ""]
        for w in [*weights, None]:
            part = [r for r in split if (w is None or r["memorization_weight"] == w) and r["fine_tunes"] == 1]
            base = [r["regret"] for r in part if r["method"] == "single-best"]
            out += [
                f"**Memorization weight {w}**" if w is not None else "**All preferences pooled**",
                "",
                "| method (1 fine-tune) | mean [95% CI] | IQM | > 0.2 | worst | hits "
                f"| minus {reference} [95% CI] | gap closed |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for m in methods:
                mine = [r for r in part if r["method"] == m]
                if not mine:
                    continue
                d = describe(mine, paired_differences(part, m, reference) if m != reference else None)
                if w is None:
                    pooled[label, m] = d
                diff = f"{d['diff']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}]" if "diff" in d else "-"
                closed = (
                    1 - d["mean"] / float(np.mean(base)) if base and np.mean(base) > 1e-9 else float("nan")
                )
                out.append(
                    f"| {m} | {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}] | {d['iqm']:.3f} | "
                    f"{d['above_0.2']:.0%} | {d['worst']:.3f} | {d['hits']:.0%} | {diff} | {closed:+.2f} |"
                )
            out.append("")
        counts = sorted({r["fine_tunes"] for r in split})
        out += [
            f"**Mean regret by fine-tunes, all preferences pooled** ({label})",
            "",
            "| method | " + " | ".join(str(n) for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        at = grouped(split, lambda r: (r["method"], r["fine_tunes"]))
        for m in methods:
            cells = [f"{mean_regret(at[m, n]):.3f}" if (m, n) in at else "" for n in counts]
            if sum(bool(c) for c in cells) > 1:
                out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
        if any(r["method"] == SEARCHER for r in split):
            out += [*per_task(split, label), ""]
            out += [*against_the_best(split, weights, label), ""]
            if any(r["method"] == STARTING_POINT for r in split):
                out += [*against_the_best(split, weights, label, exclude=(STARTING_POINT,)), ""]
    return "\n".join([*headline(rows), "", *first_picks(pooled), "", *out])


def first_picks(pooled: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """Markdown rows: each method's first pick (1 fine-tune), all preferences pooled, on every
    split side by side: mean [task-level 95% interval], IQM, worst row and hit rate, from
    ``pooled[split, method]`` (:func:`describe`'s output)."""
    labels = list(dict.fromkeys(label for label, _ in pooled))
    methods = list(dict.fromkeys(m for _, m in pooled))
    head = " | ".join(f"{label}: mean [95% CI] | IQM | worst | hits" for label in labels)
    out = [
        "**The first pick (1 fine-tune), all preferences pooled**",
        "",
        f"| method | {head} |",
        "|---|" + "---|---|---|---|" * len(labels),
    ]
    for m in methods:
        cells = []
        for label in labels:
            d = pooled.get((label, m))
            cells += (
                [
                    f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]",
                    f"{d['iqm']:.3f}",
                    f"{d['worst']:.3f}",
                    f"{d['hits']:.0%}",
                ]
                if d
                else ["", "", "", ""]
            )
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def summarise_tuning(rows: list[dict[str, Any]], chosen: tuple[float, int]) -> str:
    """Markdown: a method's mean regret for every (learning rate, length) at each number of
    fine-tunes and over them, with a task-level 95% interval of the latter, the chosen setting
    (the lowest mean over budgets) marked."""
    tasks = sorted({r["task"] for r in rows})
    counts = sorted({int(r["fine_tunes"]) for r in rows})
    seeds, weights = len({r["seed"] for r in rows}), sorted({r["memorization_weight"] for r in rows})
    unit = "boosting iterations" if rows and rows[0]["method"] == "regression" else "training episodes"
    out = [
        f"`{rows[0]['method'] if rows else ''}`: leave one training task out ({len(tasks)} tasks: "
        f"{', '.join(tasks)}; no held-out task), {seeds} seeds, memorization weights {weights}.",
        "",
        f"| learning rate | {unit} | " + " | ".join(f"{n} fine-tunes" for n in counts) + " | mean [95% CI] |",
        "|---|---|" + "---|" * (len(counts) + 1),
    ]
    for lr, length in sorted({(float(r["learning_rate"]), int(r["length"])) for r in rows}):
        mine = [r for r in rows if float(r["learning_rate"]) == lr and int(r["length"]) == length]
        cells = [f"{np.mean([r['regret'] for r in mine if int(r['fine_tunes']) == n]):.3f}" for n in counts]
        d = describe(mine)
        mark = " (chosen)" if (lr, length) == chosen else ""
        out.append(
            f"| {lr:g} | {length}{mark} | "
            + " | ".join(cells)
            + f" | {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}] |"
        )
    return "\n".join(out)


def summarise_nested(
    nested: list[dict[str, Any]], chosen: dict[str, tuple[float, int]], flat: list[dict[str, Any]]
) -> str:
    """Markdown: per task, the setting its inner folds chose and its regret with it (``nested``,
    the rows of :func:`~research.benchmark.experiments.nested_rows`), then the mean regret at each
    number of fine-tunes nested against ``flat`` (the one setting chosen on every fold, its test
    tasks included: optimistic), each with a task-level 95% interval."""
    counts = sorted({int(r["fine_tunes"]) for r in nested})
    out = [
        "**Nested** (each left-out task's setting chosen on the fits that left out it and one other "
        "task, scored on the other: its own results never choose it)",
        "",
        "| task | chosen learning rate | chosen length | "
        + " | ".join(f"{n} fine-tunes" for n in counts)
        + " |",
        "|---|---|---|" + "---|" * len(counts),
    ]
    for task, (lr, length) in sorted(chosen.items()):
        mine = [r for r in nested if r["task"] == task]
        cells = [f"{np.mean([r['regret'] for r in mine if int(r['fine_tunes']) == n]):.3f}" for n in counts]
        out.append(f"| {task} | {lr:g} | {length} | " + " | ".join(cells) + " |")
    out += ["", "| tuning | " + " | ".join(f"{n} fine-tunes" for n in counts) + " | mean [95% CI] |"]
    out.append("|---|" + "---|" * (len(counts) + 1))
    for label, rows in (("nested (honest)", nested), ("one setting for every fold (optimistic)", flat)):
        cells = []
        for n in counts:
            d = describe([r for r in rows if int(r["fine_tunes"]) == n])
            cells.append(f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]")
        d = describe(rows)
        out.append(f"| {label} | {' | '.join(cells)} | {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}] |")
    return "\n".join(out)


SEARCHER = "ppo-search"
"""The search policy; its ablations (``ppo-search-...``) are never its comparators."""
STARTING_POINT = "gp-prior"
"""What the search policy is before PPO changes it (its logits start as this acquisition)."""


def per_task(split: list[dict[str, Any]], label: str) -> list[str]:
    """Markdown rows: the search policy's mean regret on each task (over preferences and seeds) at
    every number of fine-tunes, beside the best other method at 1 fine-tune on the split (lowest
    pooled mean, search-policy ablations and its starting point left out) on the same task."""
    counts = sorted({r["fine_tunes"] for r in split if r["method"] == SEARCHER})
    at_one = [r for r in split if r["fine_tunes"] == 1]
    means = {
        m: float(np.mean([r["regret"] for r in at_one if r["method"] == m]))
        for m in dict.fromkeys(r["method"] for r in at_one)
        if not m.startswith(SEARCHER) and m != STARTING_POINT
    }
    best = min(means, key=means.__getitem__) if means else None
    out = [
        f"**The search policy per task** ({label}; mean regret over preferences and seeds after "
        f"{', '.join(map(str, counts))} fine-tunes)",
        "",
        "| task | " + " | ".join(map(str, counts)) + (f" | {best} at 1 |" if best else " |"),
        "|---|" + "---|" * (len(counts) + bool(best)),
    ]
    for task in sorted({r["task"] for r in split}):
        mine = [r for r in split if r["task"] == task and r["method"] == SEARCHER]
        cells = [f"{np.mean([r['regret'] for r in mine if r['fine_tunes'] == n]):.3f}" for n in counts]
        if best:
            theirs = [r["regret"] for r in at_one if r["task"] == task and r["method"] == best]
            cells.append(f"{np.mean(theirs):.3f}")
        out.append(f"| {task} | " + " | ".join(cells) + " |")
    return out


def against_the_best(
    split: list[dict[str, Any]], weights: list[float], label: str, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Markdown rows: at each number of fine-tunes, the search policy's mean regret minus that of
    the best other method there (the lowest mean, chosen on these very rows: the hardest
    comparator), pooled with its task-level 95% interval and per preference. ``exclude``: methods
    left out of the comparators (its own starting point, to ask how it fares against the rest)."""
    without = f", {', '.join(f'`{m}`' for m in exclude)} left out" if exclude else ""
    out = [
        "**The search policy against the best other method at each number of fine-tunes** "
        f"({label}{without}; negative: the search policy is better)",
        "",
        "| fine-tunes | best other method | its mean | search policy | difference [95% CI] | "
        + " | ".join(f"w={w}" for w in weights)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(weights),
    ]
    for n in sorted({r["fine_tunes"] for r in split if r["method"] == SEARCHER}):
        at = [r for r in split if r["fine_tunes"] == n]
        means = {
            m: float(np.mean([r["regret"] for r in at if r["method"] == m]))
            for m in dict.fromkeys(r["method"] for r in at)
            if not m.startswith(SEARCHER) and m not in exclude
        }
        if not means:
            continue
        best = min(means, key=means.__getitem__)
        d = paired_differences(at, SEARCHER, best)
        lo, hi = task_bootstrap(_by_task(d), np.mean)
        mine = np.mean([r["regret"] for r in at if r["method"] == SEARCHER])
        per = [np.mean([r["regret"] for r in d if r["memorization_weight"] == w]) for w in weights]
        out.append(
            f"| {n} | {best} | {means[best]:.3f} | {mine:.3f} | "
            f"{np.mean([r['regret'] for r in d]):+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            + " | ".join(f"{v:+.3f}" for v in per)
            + " |"
        )
    return out


def plot_transfer(rows: list[dict[str, Any]], path: Path) -> None:
    """Top: bars of mean zero-shot regret (1 fine-tune) with task-level 95% intervals per method,
    the splits side by side. Below, one panel per split: mean regret against the number of
    fine-tunes for every method judged at more than one, the search policy with its interval."""
    plt = pyplot()

    first = [r for r in rows if r["fine_tunes"] == 1]
    methods = list(dict.fromkeys(r["method"] for r in first))
    labels = [s for s in SPLITS if any(split_of(r) == s for r in rows)]
    fig = plt.figure(figsize=(max(6, 0.6 * len(methods)), 9))
    grid = fig.add_gridspec(2, max(len(labels), 1), hspace=0.75, bottom=0.14)
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        offset = (i - (len(labels) - 1) / 2) * width
        stats = []
        for m in methods:
            mine = [r for r in first if r["method"] == m and split_of(r) == label]
            stats.append(
                (float(np.mean([r["regret"] for r in mine])), *task_bootstrap(_by_task(mine), np.mean))
                if mine
                else (np.nan,) * 3
            )
        mid, lo, hi = map(np.array, zip(*stats))
        bars = np.arange(len(methods)) + offset
        ax.bar(bars, mid, width, yerr=[mid - lo, hi - mid], label=label, capsize=2)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean regret, 1 fine-tune (0 = best mask)")
    ax.legend(fontsize=8)
    budgets = grouped(rows, lambda r: r["method"])
    curves = [m for m, mine in budgets.items() if len({r["fine_tunes"] for r in mine}) > 1]
    palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    colours = dict(zip(curves, palette[0::2] + palette[1::2]))  # ten distinct hues, then their tints
    if SEARCHER in colours:
        colours[SEARCHER] = "black"
    for i, label in enumerate(labels):
        panel = fig.add_subplot(grid[1, i])
        plot_budgets([r for r in rows if split_of(r) == label and r["method"] in colours], panel, colours)
        panel.set_title(label, fontsize=9)
        if i == 0:
            panel.set_ylabel("mean regret (log)")
    handles, names = panel.get_legend_handles_labels() if labels else ([], [])
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=7, frameon=False)
    save_figure(fig, path)
    plt.close(fig)


def plot_budgets(split: list[dict[str, Any]], ax: Any, colours: dict[str, Any]) -> None:
    """On ``ax``: each method's mean regret against the number of fine-tunes (log-log), in its
    colour; the search policy bold, with its task-level 95% interval; its ablations dashed."""
    by = grouped(split, lambda r: (r["method"], r["fine_tunes"]))
    for m, colour in colours.items():
        counts = sorted(n for method, n in by if method == m)
        means = [mean_regret(by[m, n]) for n in counts]
        style = "--" if m.startswith(SEARCHER + "-") else "-"
        ax.plot(counts, means, style, marker="o", ms=3, lw=2.5 if m == SEARCHER else 1, color=colour, label=m)
        if m == SEARCHER and counts:
            lo, hi = zip(*(task_bootstrap(_by_task(by[m, n]), np.mean) for n in counts))
            ax.fill_between(counts, lo, hi, alpha=0.15, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    ax.set_xlabel("fine-tunes")


def plot_curves(
    rows: list[dict[str, Any]], path: Path, x: str = "fine_tunes", xlabel: str = "distinct fine-tunes"
) -> str:
    """Regret (IQM over tasks, preferences, seeds) of each method against ``x``; returns the
    Markdown table at powers of two (or at every value of ``x`` when there are few)."""
    plt = pyplot()

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


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV file, written atomically."""
    from memrl.utils import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
