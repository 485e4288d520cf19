"""Reports: sample grids beside nearest training images, the quality-vs-memorization Pareto plot,
reward over training, and a Markdown summary.

    python -m memrl.report RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from memrl.agents.policy import load_policy
from memrl.cli import run_main
from memrl.config import Config, load_config
from memrl.errors import ConfigError
from memrl.evaluator import command_store, table_path
from memrl.render import sample_grid
from memrl.reward import References, Reward, pareto_front
from memrl.runs import RunFolder
from memrl.store import EvaluationStore
from memrl.task import TaskContext, suite
from memrl.utils import atomic_path, atomic_write_text

__all__ = ["main", "pyplot", "save_figure", "task_rows", "write_report"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (writes files, opens no window), imported on first
    use: memrl's one lazy import of matplotlib, so commands that plot nothing never load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def task_rows(task_cfg: Config, stores: list[Any]) -> tuple[list[dict[str, Any]], Any]:
    """Evaluations of one task (its data, fine-tune seed and search space) in the stores, the
    first store's row winning a repeated spec, and that task's context."""

    ctx = TaskContext.get(task_cfg)
    fp, seed = ctx.fingerprints["data"], task_cfg.finetune.seed
    rows: dict[str, dict[str, Any]] = {}
    for store in stores:
        for r in store.rows():
            if (
                r["ok"]
                and r["data_fingerprint"] == fp
                and r["seed"] == seed
                and len(r["mask"]) == ctx.space.k
            ):
                rows.setdefault(r["spec_hash"], r)
    return list(rows.values()), ctx


def _plot_rewards(run_dir: Path) -> None:
    """reward.png: episode rewards over training with a running mean (from episodes.jsonl)."""
    plt = pyplot()

    episodes_file = RunFolder(run_dir).episodes
    if not episodes_file.is_file():
        return
    rewards = []
    for line in episodes_file.read_text().splitlines():
        try:
            rewards.append(json.loads(line)["reward"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a crash mid-write
    if not rewards:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(rewards, ".", alpha=0.5, label="episode")
    window = max(1, len(rewards) // 10)
    smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window - 1, len(rewards)), smooth, "r-", label=f"mean of {window}")
    ax.set_xlabel("episode (= evaluation)")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    save_figure(fig, RunFolder(run_dir).figure("reward"))
    plt.close(fig)


def _plot_samples(run_dir: Path, store, rows, ctx, masks: tuple[str, str]) -> bool:
    """samples.png: generated samples beside their nearest training images, full vs chosen."""
    plt = pyplot()

    grids = []
    for label, key in zip(("all groups", "chosen mask"), masks):
        ev = next((store.get(r["spec_hash"]) for r in rows if r["mask"] == key), None)
        if ev is not None and ev.samples is not None:
            grids.append((label, sample_grid(ev.samples, ev.nearest, ctx.splits.private)))
    if not grids:
        return False
    fig, axes = plt.subplots(1, len(grids), figsize=(2.2 * len(grids), 8))
    for ax, (label, grid) in zip(np.atleast_1d(axes), grids):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{label}\nsample | nearest train", fontsize=8)
        ax.axis("off")
    save_figure(fig, RunFolder(run_dir).figure("samples"))
    plt.close(fig)
    return True


def write_report(
    run_dir: str | Path,
    config: Config | None = None,
    chosen: list[int] | None = None,
    task_cfg: Config | None = None,
    sections: list[str] | None = None,
    task_name: str | None = None,
) -> Path:
    """Write ``report.md`` and PNG plots into ``run_dir`` from its store, the config's table and the
    episode log, for ``task_cfg`` (default: the config's first training task); ``sections`` are
    Markdown appended at the end."""
    plt = pyplot()

    run_dir = Path(run_dir)
    cfg = config or load_config(RunFolder(run_dir).config)
    if task_cfg is None:
        entries = suite(cfg)
        task_cfg = next((e for e in entries if not e.heldout), entries[0]).cfg
    store = EvaluationStore(command_store(cfg, run_dir), readonly=True)
    tables = [EvaluationStore(table_path(cfg.env.table), readonly=True)] if cfg.env.table else []
    rows, ctx = task_rows(task_cfg, [store, *tables])
    k = ctx.space.k
    rows = [r for r in rows if r["method"] == cfg.search.method]
    mem_key, q_key = cfg.reward.memorization, cfg.reward.quality
    refs_none = next((r for r in rows if r["mask"] == "0" * k), None)
    refs_full = next((r for r in rows if r["mask"] == "1" * k), None)
    lines = [f"# memrl report: {run_dir.name}", ""]
    if not rows or refs_none is None or refs_full is None:
        lines.append("No evaluations with both references (no fine-tune, full) for the first task yet.")
        out = RunFolder(run_dir).report
        atomic_write_text(out, "\n".join(lines) + "\n")
        return out
    reward = Reward(cfg.reward, References(refs_none, refs_full))
    for r in rows:
        r["reward"] = reward(r)
    card_file = run_dir / "policy.card.json"
    if chosen is None and (RunFolder(run_dir).policy).is_file() and card_file.is_file():
        chosen = [int(v) for v in load_policy(RunFolder(run_dir).policy).propose(task_cfg)[0]]
    chosen_key = (
        "".join(map(str, chosen)) if chosen is not None else max(rows, key=lambda r: r["reward"])["mask"]
    )
    chosen_row = next((r for r in rows if r["mask"] == chosen_key), None)

    # Pareto plot: memorization (x) vs quality (y), both lower is better.
    points = np.array([[r[mem_key], r[q_key]] for r in rows])
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(points[:, 0], points[:, 1], c=[r["reward"] for r in rows], cmap="viridis", s=28)
    order = np.argsort(points[front, 0])
    ax.plot(points[front][order, 0], points[front][order, 1], "r--", lw=1, label="Pareto front")
    for label, row, marker in (("no fine-tune", refs_none, "s"), ("all groups", refs_full, "^")):
        ax.scatter(
            row[mem_key], row[q_key], marker=marker, s=90, facecolors="none", edgecolors="k", label=label
        )
    if chosen_row is not None:
        ax.scatter(chosen_row[mem_key], chosen_row[q_key], marker="*", s=220, c="red", label="chosen")
    ax.set_xlabel(f"memorization: {mem_key}")
    ax.set_ylabel(f"quality: {q_key} (lower is better)")
    ax.legend(fontsize=8)
    ax.set_title("every evaluated mask (colour: reward)")
    save_figure(fig, RunFolder(run_dir).figure("pareto"))
    plt.close(fig)

    _plot_rewards(run_dir)
    grids = _plot_samples(run_dir, store, rows, ctx, ("1" * k, chosen_key))

    def describe(r: dict[str, Any]) -> str:
        groups = ctx.space.selected([int(c) for c in r["mask"]]) or ["(none)"]
        return (
            f"| `{r['mask']}` | {r['reward']:+.3f} | {r[mem_key]:.4f} | {r[q_key]:.4f} | "
            f"{r.get('canary_copy_fraction', float('nan')):.3f} | "
            f"{100 * r.get('trainable_fraction', 0):.2f} | {', '.join(groups)} |"
        )

    header = (
        f"| mask | reward | {mem_key} | {q_key} | canary copies | trainable % | groups |\n"
        "|---|---|---|---|---|---|---|"
    )
    best = sorted(rows, key=lambda r: -r["reward"])[:10]
    lines += [
        f"Task: {f'**{task_name}** ' if task_name else ''}`{ctx.fingerprints['data']}` · "
        f"base model `{ctx.fingerprints['base_model']}` · "
        f"search space `{ctx.space.signature}` ({k} groups, {cfg.search.granularity}, {cfg.search.method})",
        f"Evaluations of this task (run store and table): {len(rows)}.",
        "",
        "## Chosen mask",
        "",
        header,
        describe(chosen_row) if chosen_row else f"| `{chosen_key}` | not evaluated yet | | | | | |",
        "",
        "## References",
        "",
        header,
        describe(refs_none),
        describe(refs_full),
        "",
        "## Best masks",
        "",
        header,
        *[describe(r) for r in best],
        "",
        "![Pareto](pareto.png)",
    ]
    if (RunFolder(run_dir).figure("reward")).is_file():
        lines.append("![reward](reward.png)")
    if grids:
        lines.append("![samples](samples.png)")
    lines += sections or []
    out = RunFolder(run_dir).report
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m memrl.report", description="Write a run's report.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)

    def body() -> int:
        if not RunFolder(args.run_dir).config.is_file():
            raise ConfigError(f"{args.run_dir}: no config.yaml here; give a run directory")
        print(write_report(args.run_dir))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
