"""What a curve costs: one fine-tune with and without checkpoints, side by side in one run.

A checkpoint (``finetune.checkpoint_every``) measures the loss-based metrics of the model so far
and accumulates each group's gradient norm every step; ``finetune.sample_at`` adds sampling and
the sample-based metrics. Prints seconds and the ratio to the plain fine-tune (the issue's budget:
checkpoint losses at most 15% of the fine-tune).

    OMP_NUM_THREADS=1 python bench/bench_curves.py            # the default config, 200 steps
    python bench/bench_curves.py --steps 400 --every 25 --repeats 2
"""

from __future__ import annotations

import argparse

import numpy as np

from memrl.config import load_config
from memrl.context import TaskContext
from memrl.scoring import finetune_and_score


def timed(cfg, mask: np.ndarray) -> tuple[float, float]:
    """Seconds of the fine-tune (checkpoints included) and of the checkpoints alone."""
    _, ev = finetune_and_score(TaskContext.get(cfg), mask)
    return ev.timings["finetune"] + ev.timings.get("checkpoints", 0.0), ev.timings.get("checkpoints", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = load_config(args.config, {"finetune.steps": args.steps})
    mask = np.ones(TaskContext.get(base).space.k, dtype=np.int64)
    cases = {
        "plain": base,
        f"checkpoints every {args.every}": load_config(base, {"finetune.checkpoint_every": args.every}),
        f"+ sampling at {args.steps // 2}": load_config(
            base, {"finetune.checkpoint_every": args.every, "finetune.sample_at": [args.steps // 2]}
        ),
    }
    _ = TaskContext.get(base).base, TaskContext.get(base).encoder  # built before any timing
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that a slower spell of the machine hits every case
        for name, cfg in cases.items():
            results[name].append(timed(cfg, mask))
    plain = min(t for t, _ in results["plain"])
    print(f"{args.config}, mask of ones, {args.steps} steps, best of {args.repeats}")
    for name, runs in results.items():
        total, checkpoints = min(runs)
        print(f"  {name:<28} {total:7.1f} s  ({total / plain:.3f}x plain; checkpoints {checkpoints:.1f} s)")


if __name__ == "__main__":
    main()
