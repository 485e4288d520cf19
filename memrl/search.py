"""Search baselines on the same evaluator and store as PPO.

    python -m memrl.search --method random --budget 16
    python -m memrl.search --method optuna-tpe --budget 32 --config test
    python -m memrl.search --method fixed

Writes ``OUT/search-<method>.csv`` (one row per evaluation), the resolved config and a report;
every evaluation lands in the store (``env.store``; default ``OUT/evaluations.sqlite``), so
methods sharing a store share evaluations and compare on equal terms.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import dump_config
from memrl.errors import MemrlError
from memrl.evaluator import command_store
from memrl.utils import atomic_path, setup_logging


def main(argv: list[str] | None = None) -> int:
    from memrl.agents.baselines import METHODS, run_search
    from memrl.report import write_report

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m memrl.search",
        description="Run a search baseline (random, Optuna, exhaustive, fixed presets) on MemControl-v0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--budget", type=int, default=16, help="number of evaluations")
    parser.add_argument(
        "--workers", type=int, default=1, help="evaluations at once (concurrent with env.backend=ray)"
    )
    add_config_args(parser)
    parser.add_argument("--task", default="0", help="index or name of a task in env.tasks")
    parser.add_argument("--out", type=Path, default=Path("runs/search"), help="results folder")
    args = parser.parse_args(argv)
    return run_main(
        lambda: _search(args, run_search, write_report),
        interrupted=f"evaluations so far are stored; rerun to continue (they are reused from {args.out})",
    )


def _search(args: argparse.Namespace, run_search, write_report) -> int:
    cfg = config_from_args(args)
    task = int(args.task) if args.task.isdigit() else args.task
    args.out.mkdir(parents=True, exist_ok=True)
    cfg.env.store = str(command_store(cfg, args.out))
    dump_config(cfg, args.out / "config.yaml")
    rows = run_search(cfg, args.method, args.budget, cfg.seed, task, args.workers)
    if not any(r["ok"] for r in rows):
        raise MemrlError(
            f"every one of the {len(rows)} evaluations failed (first: {rows[0]['metrics'] or 'see the log'})"
        )
    table = args.out / f"search-{args.method}.csv"
    columns = [
        "label",
        "mask",
        "method",
        "reward",
        "memorization_term",
        "quality_term",
        "ok",
        "cache_hit",
        "seconds",
    ]
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    with atomic_path(table) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns + metric_keys)
        for r in rows:
            mask = "".join(map(str, r["mask"]))
            writer.writerow(
                [r["label"], mask] + [r[c] for c in columns[2:]] + [r["metrics"].get(k) for k in metric_keys]
            )
    best = max(rows, key=lambda r: r["reward"])
    spent = sum(r["seconds"] for r in rows)
    print(
        f"{len(rows)} evaluations ({spent:.0f} s of fine-tuning and scoring, cache hits free); "
        f"best {best['label']} ({best['method']}) reward {best['reward']:+.3f}"
    )
    from memrl.task import resolve_task

    report = write_report(args.out, cfg, chosen=best["mask"], task_cfg=resolve_task(cfg, task))
    print(f"table: {table}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
