"""Search one task's mask with any registered searcher (:mod:`memrl.searchers`), live.

    python -m memrl.search --method random --budget 16
    python -m memrl.search --method tpe --budget 32 --config test
    python -m memrl.search --method fixed
    python -m memrl.search --method gp-prior --budget 4 --policy runs/RUN/policy.zip

Methods that transfer from training tasks (single-best, portfolio, nearest-task, gp-prior, ...)
read the training tasks' tables from a search policy's prior (``--policy``); ``policy`` runs the
policy itself. Writes ``OUT/search-<method>.csv`` (one row per evaluation), the resolved config
and a report; every evaluation lands in the store (``env.store``; default
``OUT/evaluations.sqlite``), so methods sharing a store share evaluations and compare on equal
terms. A repeated mask is a stored evaluation and does not count against ``--budget``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from memrl.agents.policy import load_policy
from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config, dump_config
from memrl.errors import ConfigError, MemrlError
from memrl.evaluator import command_store
from memrl.report import write_report
from memrl.reward import preference_of
from memrl.searchers import (
    ALIASES,
    SEARCHERS,
    History,
    Knowledge,
    TaskOracle,
    make_searcher,
    names,
    run,
    spec_of,
)
from memrl.task import Task, make_evaluator, resolve_task
from memrl.utils import atomic_path, setup_logging

__all__ = ["main", "run_search"]

log = logging.getLogger("memrl.search")

COLUMNS = (
    "label",
    "mask",
    "method",
    "reward",
    "memorization_term",
    "quality_term",
    "ok",
    "cache_hit",
    "seconds",
)


def run_search(
    cfg: Config,
    method: str,
    budget: int,
    seed: int = 0,
    task: int | str | dict[str, Any] = 0,
    workers: int = 1,
    policy: Any = None,
) -> list[dict[str, Any]]:
    """Search task ``task`` of ``cfg`` with registered searcher ``method`` for ``budget``
    fine-tunes, ``workers`` at a time (concurrent with ``env.backend=ray``); ``policy``: a loaded
    policy (its prior serves the transfer searchers). Returns one row per evaluation."""

    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    if budget <= 0:
        raise ConfigError(f"--budget {budget} must be positive")
    spec = spec_of(method)
    target = Task(resolve_task(cfg, task), make_evaluator(cfg))
    if policy is not None:
        policy.check_space(target.space)
    wants_descriptor = bool({"prior", "policy"} & set(spec.needs))
    knowledge = Knowledge(
        k=target.space.k,
        preference=preference_of(cfg.reward),
        seed=seed,
        budget=budget,
        group_names=list(target.space.names),
        descriptor=target.descriptor() if wants_descriptor else None,
        prior=getattr(policy, "prior", None),
        policy=policy,
    )
    searcher = make_searcher(method, knowledge)
    with tqdm(total=budget, desc=f"{method} search") as bar:

        def progress(history: History) -> None:
            bar.update()
            result = history.results[-1]
            log.info(
                "%s: fine-tune %d of %d, mask %s, reward %+.3f (%.0f s)",
                method,
                len(history),
                budget,
                "".join(map(str, history.trials[-1].mask)),
                result.reward,
                result.seconds,
            )

        history = run(searcher, TaskOracle(target, workers=workers), budget, workers, progress)
    return rows_of(history, cfg.search.method)


def rows_of(history: History, default_method: str) -> list[dict[str, Any]]:
    """One row per evaluated trial: label, mask, PEFT method, reward, terms, metrics."""
    rows = []
    for trial, result in zip(history.trials, history.results):
        mask = [int(m) for m in trial.mask]
        rows.append(
            {
                "label": trial.label or "".join(map(str, mask)),
                "mask": mask,
                "method": trial.peft or default_method,
                "reward": result.reward,
                "ok": result.ok,
                "cache_hit": result.cache_hit,
                "memorization_term": result.memorization,
                "quality_term": result.quality,
                "seconds": result.seconds,
                "metrics": result.metrics,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m memrl.search",
        description="Search one task's mask with a registered searcher on MemControl-v0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__ + "\nMethods:\n" + "\n".join(f"  {n:20s}{s.summary}" for n, s in SEARCHERS.items()),
    )
    parser.add_argument("--method", choices=[*names(), *ALIASES], required=True)
    parser.add_argument("--budget", type=int, default=16, help="fine-tunes (distinct masks)")
    parser.add_argument(
        "--workers", type=int, default=1, help="evaluations at once (concurrent with env.backend=ray)"
    )
    parser.add_argument("--policy", type=Path, help="a trained policy (its prior serves transfer methods)")
    add_config_args(parser)
    parser.add_argument("--task", default="0", help="index or name of a task in env.tasks")
    parser.add_argument("--out", type=Path, default=Path("runs/search"), help="results folder")
    args = parser.parse_args(argv)
    return run_main(
        lambda: _search(args),
        interrupted=f"evaluations so far are stored; rerun to continue (they are reused from {args.out})",
    )


def _search(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    task = int(args.task) if args.task.isdigit() else args.task
    policy = load_policy(args.policy) if args.policy is not None else None
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=args.out / "search.log")
    cfg.env.store = str(command_store(cfg, args.out))
    dump_config(cfg, args.out / "config.yaml")
    rows = run_search(cfg, args.method, args.budget, cfg.seed, task, args.workers, policy)
    if not any(r["ok"] for r in rows):
        raise MemrlError(
            f"every one of the {len(rows)} evaluations failed (first: {rows[0]['metrics'] or 'see the log'})"
        )
    table = args.out / f"search-{args.method}.csv"
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    with atomic_path(table) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*COLUMNS, *metric_keys])
        for r in rows:
            mask = "".join(map(str, r["mask"]))
            writer.writerow(
                [r["label"], mask] + [r[c] for c in COLUMNS[2:]] + [r["metrics"].get(k) for k in metric_keys]
            )
    best = max(rows, key=lambda r: r["reward"])
    spent = sum(r["seconds"] for r in rows)
    print(
        f"{len(rows)} evaluations ({spent:.0f} s of fine-tuning and scoring, cache hits free); "
        f"best {best['label']} ({best['method']}) reward {best['reward']:+.3f}"
    )
    report = write_report(args.out, cfg, chosen=best["mask"], task_cfg=resolve_task(cfg, task))
    print(f"table: {table}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
