"""Evaluations per hour on Ray with 1 and 2 concurrent workers on this machine, in one run.

Each evaluation is a Ray task in a fresh worker (``max_calls=1``: imports, data and model loading
are paid per evaluation), on a local Ray with as many CPUs as the machine.

    python bench/bench_ray.py [--config test] [--evals 4]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import ray

from memrl.backends import run_ray
from memrl.config import load_config
from memrl.task import TaskContext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="test")
    parser.add_argument("--evals", type=int, default=4)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = load_config(args.config, {"env.backend": "ray"})
    ctx = TaskContext.get(cfg)
    _ = ctx.base, ctx.encoder  # cached on disk before timing, as in a long run
    print(f"{args.evals} uncached evaluations of {args.config} per layout, fresh Ray worker each")
    print("| concurrent workers | seconds | evals/hour | ratio |\n|---|---|---|---|")
    first = None
    for offset, workers in enumerate((1, 2)):
        specs = [
            TaskContext.get(load_config(cfg, {"finetune.seed": 1000 * (offset + 1) + i})).spec(
                np.ones(ctx.space.k, int)
            )
            for i in range(args.evals)
        ]
        start = time.perf_counter()
        for i in range(0, len(specs), workers):
            assert all(ev.ok for ev in run_ray(specs[i : i + workers], cfg.ray))
        seconds = time.perf_counter() - start
        rate = args.evals / seconds * 3600
        first = first or rate
        print(f"| {workers} | {seconds:.0f} | {rate:.0f} | {rate / first:.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
