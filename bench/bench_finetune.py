"""Masked fine-tuning step time vs full fine-tuning, side by side in one run.

Freezing is done by requires_grad, so autograd stops at the first trainable module: a mask
deep in the decoder skips most of the backward pass. Prints seconds per step and the ratio to
full fine-tuning for several masks and PEFT methods on the default base UNet (16 px, batch 32),
and for a switchable run (control mode's ``env.mask_changes=apply``: the optimizer holds every
block, one trains) beside the same mask's plain run.

    python bench/bench_finetune.py [--config default] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memrl.config import load_config
from memrl.finetune import finetune
from memrl.task import TaskContext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(args.config, {"finetune.steps": args.steps, "search.granularity": "block"})
    ctx = TaskContext.get(cfg)
    space, data = ctx.space, ctx.splits.finetune_set()
    ones = np.ones(space.k, int)
    cases = [("full (all blocks)", "full", ones, False)]
    for group in space.names:
        cases.append((f"only {group}", "full", space.mask_from_groups([group]), False))
    for group in (space.names[0], space.names[-1]):
        cases.append(
            (f"only {group}, switchable (every block held)", "full", space.mask_from_groups([group]), True)
        )
    for method in ("attention", "bias_norm", "lora", "difffit", "svdiff"):
        cases.append((f"{method} on all blocks", method, ones, False))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg.finetune.batch_size}, "
        f"{cfg.data.resolution} px, {args.steps} steps per case"
    )
    print("| mask | trainable % | s/step | ratio to full |\n|---|---|---|---|")
    reference = None
    for label, method, mask, switchable in cases:
        run = load_config(cfg, {"search.method": method})
        held = space.prefixes(ones) if switchable else None
        finetune(ctx.base, data, space.prefixes(mask), load_config(run, {"finetune.steps": 2}), None, held)
        start = time.perf_counter()
        _, result = finetune(ctx.base, data, space.prefixes(mask), run, None, held)
        per_step = (time.perf_counter() - start) / args.steps
        reference = reference or per_step
        pct = 100 * result.trainable_fraction
        print(f"| {label} | {pct:.2f} | {per_step:.3f} | {per_step / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main()
