"""Throughput of independent evaluations on this machine: one process with all threads against
several single-threaded worker processes side by side (how ``python -m memrl.tables build`` and
other many-evaluation jobs should run), measured in one run.

    python bench/bench_workers.py [--config default] [--evals 4]

Every evaluation is uncached (distinct fine-tune seeds, no store); prints evaluations per hour
per layout and the ratio to the first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

from memrl.config import load_config
from memrl.evaluator import _init_worker, _work
from memrl.task import TaskContext


def _warm(config: str) -> None:
    """Import everything and load the base model and encoder, as a long-running worker would have."""
    import time

    from memrl.backends import run_inprocess  # noqa: F401

    ctx = TaskContext.get(load_config(config))
    _ = ctx.base, ctx.encoder
    time.sleep(3)  # so that each worker takes one warm-up call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="default")
    parser.add_argument("--evals", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cores = os.cpu_count() or 2
    k = TaskContext.get(cfg).space.k
    _ = TaskContext.get(cfg).encoder  # trained once and cached for the workers
    layouts = [(1, cores), (cores, 1)]
    print(f"{args.evals} uncached evaluations of {args.config} (mask of ones) per layout, {cores} cores")
    print("| workers x threads | seconds | evals/hour | ratio |\n|---|---|---|---|")
    first = None
    for offset, (workers, threads) in enumerate(layouts):
        specs = [
            TaskContext.get(load_config(cfg, {"finetune.seed": 100 * (offset + 1) + i})).spec(np.ones(k, int))
            for i in range(args.evals)
        ]
        os.environ["OMP_NUM_THREADS"] = str(threads)
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
            pool.map(_warm, [args.config] * workers, chunksize=1)
            start = time.perf_counter()
            pool.map(_work, [s.to_json() for s in specs], chunksize=1)
            seconds = time.perf_counter() - start
        rate = args.evals / seconds * 3600
        first = first or rate
        print(f"| {workers} x {threads} | {seconds:.0f} | {rate:.0f} | {rate / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
