"""Summaries of the benchmark's rows: interquartile means with bootstrap intervals, tables, plots."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


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


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV file, written atomically."""
    from memrl.utils import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
