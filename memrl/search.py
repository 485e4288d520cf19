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

from memrl.config import ConfigError, dump_config, load_config, parse_overrides
from memrl.data import DataError
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
    parser.add_argument("--config", default="default", help="config name or YAML path")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", type=int, default=0, help="index into env.tasks")
    parser.add_argument("--out", type=Path, default=Path("runs/search"), help="results folder")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        overrides.setdefault("seed", args.seed)
        cfg = load_config(args.config, overrides)
        args.out.mkdir(parents=True, exist_ok=True)
        if cfg.env.store is None:
            cfg.env.store = str((args.out / "evaluations.sqlite").resolve())
        dump_config(cfg, args.out / "config.yaml")
        rows = run_search(cfg, args.method, args.budget, args.seed, args.task)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    print(f"table: {table}\nreport: {write_report(args.out, cfg, chosen=best['mask'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
