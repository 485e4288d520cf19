"""Time of one evaluation's phases at the default settings (fine-tune, losses, sampling, metrics).

Runs a few uncached evaluations of the default config (no store) and prints the mean time per
phase and its share of the total, so it is clear what an env step costs on this machine.

    python bench/bench_metrics.py [--config default] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from memrl.config import load_config
from memrl.scoring import evaluate_spec
from memrl.task import TaskContext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="default")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config)
    ctx = TaskContext.get(cfg)
    masks = {"full": np.ones(ctx.space.k, int), "one group": ctx.space.mask_from_groups([ctx.space.names[3]])}
    s = cfg.sample
    print(f"{cfg.finetune.steps} fine-tune steps, {s.num_samples} samples x {s.steps} DDIM steps")
    print("| mask | finetune s | losses s | sample s | metrics s | total s |\n|---|---|---|---|---|---|")
    for label, mask in masks.items():
        runs = [
            evaluate_spec(TaskContext.get(load_config(cfg, {"finetune.seed": s})).spec(mask)).timings
            for s in range(args.repeat)
        ]
        cells = [
            statistics.mean(r[p] for r in runs) for p in ("finetune", "losses", "sample", "metrics", "total")
        ]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
