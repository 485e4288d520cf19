"""Probe: memrl.metrics.quality.domain_fidelity, the audit's "did the samples leave the base
model's domain?" figure, on the tasks of the source-vote probe (fidelity.py), with its controls.

domain_fidelity needs no source labels (a user's data has none): each sample's 5 nearest
neighbours among the task's held-out images and the base model's own samples, 0 = draws like
the base model, 1 = draws like the held-out images. Controls: the other half of the held-out
images (must be near 1), another draw of the base model (near 0), Gaussian noise and a constant
image (a domain figure alone need not rank these low: KID does; reported so nobody reads them as
fidelity). Then the curve table's best mask at weight 0.5 and the mask of ones at 25-400 steps.

    OMP_NUM_THREADS=1 python bench/results/curves/probe-fidelity/two_sample.py > .../two_sample.txt
"""

from __future__ import annotations

import numpy as np
import torch

from memrl.config import load_config
from memrl.context import TaskContext, suite
from memrl.finetune import finetune
from memrl.metrics.quality import domain_fidelity
from memrl.sampling import sample
from memrl.scoring import sample_labels

TASKS = {  # task: its best mask at weight 0.5 (docs/world.md's best-mask table)
    "text-small-dup300": "0001000",
    "hubble-small-dup100": "0000001",
    "histology": "1000000",
}
STEPS = (25, 100, 200, 400)
N = 64


def probe_task(entry, best: str) -> None:
    cfg = load_config(entry.cfg, {"finetune.steps": max(STEPS)})
    ctx = TaskContext.get(cfg)
    labels, _ = sample_labels(ctx)
    labels = labels[:N] if labels is not None else None

    def draw(model, seed: int) -> torch.Tensor:
        x = sample(model, labels, steps=cfg.sample.steps, guidance=cfg.sample.guidance, seed=seed)
        return ctx.to_images(x)[:N]

    held = ctx.splits.heldout.images
    real, other = held[: len(held) // 2], held[len(held) // 2 :]
    base = draw(ctx.base, 0)

    def cell(images: torch.Tensor) -> str:
        r = domain_fidelity(ctx.encoder, images, real, base)
        return f"{r['fidelity']:.2f}"

    g = torch.Generator().manual_seed(0)
    controls = {
        "other held-out images": other,
        "base model, another draw": draw(ctx.base, 1),
        "noise": torch.randn(other.shape, generator=g).clamp(-1, 1),
        "constant": torch.zeros_like(other),
    }
    r = domain_fidelity(ctx.encoder, other, real, base)
    print(
        f"\n## {entry.name} ({len(real)} held-out images as the data, {len(base)} base samples; "
        f"raw share floor {r['floor']:.2f}, ceiling {r['ceiling']:.2f})\n"
    )
    print("| control | fidelity |\n|---|---|")
    for name, images in controls.items():
        print(f"| {name} | {cell(images)} |", flush=True)
    print("\n| mask | " + " | ".join(f"{s} steps" for s in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for mask in (best, "1" * ctx.space.k):
        found: dict[int, str] = {}

        def checkpoint(model, n: int, found=found) -> None:
            if n in STEPS:
                found[n] = cell(draw(model, 0))

        prefixes = ctx.space.prefixes(np.array([int(c) for c in mask]))
        with torch.random.fork_rng():
            finetune(ctx.base, ctx.model_splits.finetune_set(), prefixes, cfg, checkpoint)
        print(f"| {mask} | " + " | ".join(found[s] for s in STEPS) + " |", flush=True)


def main() -> None:
    cfg = load_config("bench3")
    entries = {e.name: e for e in suite(cfg)}
    print("# domain_fidelity on bench3 tasks (64 samples, DDIM 20 steps, seed 0)")
    for task, best in TASKS.items():
        probe_task(entries[task], best)
    print(f"\nbench3 config hash {cfg.hash()}")


if __name__ == "__main__":
    main()
