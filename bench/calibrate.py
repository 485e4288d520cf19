"""Calibration of the embedded default: does the memorization signal differ between module
choices by more than its noise?

Evaluates no fine-tune, full fine-tuning, every single-group mask and a few PEFT presets, each
with several fine-tune seeds, and prints mean +- std per mask plus, for each metric, the
separation (full - none) / pooled seed std. Results land in the evaluation store, so a rerun
costs nothing.

    python bench/calibrate.py                      # the default config, 2 seeds
    python bench/calibrate.py --seeds 3 --set finetune.steps=80 data.duplication=100
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from memrl.config import load_config
from memrl.evaluator import Evaluator
from memrl.store import EvaluationStore
from memrl.task import TaskContext

COLUMNS = (
    "canary_copy_fraction",
    "near_copy_fraction",
    "canary_loss_gap",
    "loss_gap",
    "noise_norm_canary",
    "nn_similarity_mean",
    "kid",
    "heldout_loss",
)


def presets(space) -> list[tuple[str, str, np.ndarray]]:
    """(label, method, mask) triples: none, full, each single group, PEFT methods on all groups."""
    k = space.k
    rows = [("no fine-tune", "full", np.zeros(k, int)), ("full", "full", np.ones(k, int))]
    rows += [(f"only {g}", "full", space.mask_from_groups([g])) for g in space.names]
    rows += [(f"{m} (all groups)", m, np.ones(k, int)) for m in ("attention", "bias_norm", "lora")]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--store", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.set)
    ctx = TaskContext.get(cfg)
    evaluator = Evaluator(EvaluationStore(args.store), "inprocess")
    results: dict[str, list[dict[str, float]]] = {}
    times: list[float] = []
    for label, method, mask in presets(ctx.space):
        if args.only and label not in args.only:
            continue
        for seed in range(args.seeds):
            run = load_config(cfg, {"search.method": method, "finetune.seed": seed})
            ev = evaluator.evaluate(TaskContext.get(run).spec(mask))
            if not ev.ok:
                print(f"{label} seed {seed} failed: {ev.error}", file=sys.stderr)
                continue
            results.setdefault(label, []).append(ev.metrics)
            if not ev.cache_hit:
                times.append(ev.timings["total"])
            print(
                f"{label:<34} seed {seed}: "
                + " ".join(f"{c}={ev.metrics.get(c, float('nan')):.4f}" for c in COLUMNS[:4]),
                flush=True,
            )

    print(
        f"\n{cfg.data.private_size} private images, {cfg.data.canaries} canaries x "
        f"{cfg.data.duplication}, {cfg.finetune.steps} steps at lr {cfg.finetune.lr}, "
        f"{cfg.sample.num_samples} samples; {args.seeds} seeds; "
        f"threshold {ctx.threshold:.4f}"
    )
    if times:
        print(f"uncached evaluation: mean {statistics.mean(times):.1f} s over {len(times)}")
    header = "| mask | trainable % | " + " | ".join(COLUMNS) + " |"
    print(header + "\n|" + "---|" * (len(COLUMNS) + 2))
    for label, runs in results.items():
        cells = []
        for c in COLUMNS:
            vals = [r.get(c, float("nan")) for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
        pct = 100 * runs[0]["trainable_fraction"]
        print(f"| {label} | {pct:.2f} | " + " | ".join(cells) + " |")
    if "full" in results and "no fine-tune" in results:
        print("\nseparation (full - none) / pooled seed std, per metric:")
        for c in COLUMNS:
            sds = [
                statistics.stdev([r[c] for r in runs])
                for runs in results.values()
                if len(runs) > 1 and c in runs[0]
            ]
            pooled = float(np.sqrt(np.mean(np.square(sds)))) if sds else float("nan")
            full = statistics.mean(r[c] for r in results["full"])
            none = statistics.mean(r[c] for r in results["no fine-tune"])
            print(
                f"  {c:<22} full-none={full - none:+.4f}  noise={pooled:.4f}  "
                f"ratio={(full - none) / pooled if pooled else float('inf'):+.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
