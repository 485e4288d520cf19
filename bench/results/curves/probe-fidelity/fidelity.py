"""Probe: do a task's samples come from its source? (domain fidelity, 2026-12-07)

The reward's quality term is a denoising loss; on unlabelled sources samples are unconditional
and base model v2 draws its whole pretraining mix. This probe classifies samples by source with a
5-nearest-neighbour vote on the shipped encoder's features of base model v2's mix (every
training source's reserved share, labelled by source) and reports the share assigned to the
task's own source (``--heldout``: tasks of held-out sources, whose other images join the
classes): the base model, then fine-tunes with the curve table's best mask (weight 0.5) and with
the mask of ones, at 25 / 50 / 100 / 200 / 400 steps. The task's held-out images give
the classifier's own hit rate (the ceiling).

    OMP_NUM_THREADS=1 python bench/results/curves/probe-fidelity/fidelity.py > .../fidelity.txt
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from memrl.config import load_config
from memrl.context import TaskContext, suite
from memrl.data.bundled import BASE_MIX, base_count, bundled, reserved_order
from memrl.encoders import embed
from memrl.finetune import finetune
from memrl.sampling import sample
from memrl.scoring import sample_labels

TASKS = {  # task: its best mask at weight 0.5 (docs/world.md's best-mask table)
    "photos-large-dup10": "1000000",
    "histology": "1000000",
    "camera-small-dup300": "0010000",
    "cells-small-dup300": "0000001",
}
STEPS = (25, 50, 100, 200, 400)


HELDOUT_TASKS = {  # held-out sources: their own images join the classifier's classes
    "text-small-dup300": "0001000",
    "hubble-small-dup100": "0000001",
}


def mix_features(cfg, encoder, heldout: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised features of base model v2's mix, labelled by source; for a source outside the mix
    (``heldout``: the task's held-out images, kept out of the bank), as many of its other images
    as a mix source has on average."""
    feats, names = [], []
    for name in BASE_MIX:
        source = bundled(name, cfg.data.resolution, cfg.data.channels)
        part = source.subset(reserved_order(name, len(source))[: base_count(name, len(source))])
        feats.append(embed(encoder, part))
        names += [name] * len(part)
    if heldout is not None:
        own = torch.nn.functional.normalize(
            embed(encoder, bundled(cfg.data.source, cfg.data.resolution, cfg.data.channels)), dim=1
        )
        held = torch.nn.functional.normalize(embed(encoder, heldout), dim=1)
        own = own[(own @ held.T).max(dim=1).values < 0.9999]  # not the task's held-out images
        own = own[
            torch.randperm(len(own), generator=torch.Generator().manual_seed(0))[
                : len(names) // len(BASE_MIX)
            ]
        ]
        feats.append(own)
        names += [cfg.data.source] * len(own)
    return torch.nn.functional.normalize(torch.cat(feats), dim=1), np.array(names)


def share(samples: torch.Tensor, encoder, bank: torch.Tensor, names: np.ndarray, source: str) -> float:
    """The share of ``samples`` whose 5 nearest mix images mostly come from ``source``."""
    f = torch.nn.functional.normalize(embed(encoder, samples), dim=1)
    top = (f @ bank.T).topk(5, dim=1).indices.numpy()
    votes = [max(set(row), key=list(row).count) for row in names[top]]
    return float(np.mean([v == source for v in votes]))


def probe_task(entry, best: str) -> list[str]:
    """The table's lines of one task: its best mask and the mask of ones."""
    cfg = load_config(entry.cfg, {"finetune.steps": max(STEPS)})
    ctx = TaskContext.get(cfg)
    outside = cfg.data.source not in BASE_MIX
    bank, names = mix_features(cfg, ctx.encoder, ctx.splits.heldout.images if outside else None)
    source = cfg.data.source
    labels, _ = sample_labels(ctx)

    def fidelity(model) -> float:
        x = sample(model, labels, steps=cfg.sample.steps, guidance=cfg.sample.guidance, seed=0)
        return share(ctx.to_images(x), ctx.encoder, bank, names, source)

    ceiling = share(ctx.splits.heldout.images, ctx.encoder, bank, names, source)
    base = fidelity(ctx.base)
    lines = []
    for mask in (best, "1" * ctx.space.k):
        found: dict[int, float] = {}

        def checkpoint(model, n: int, found=found) -> None:
            if n in STEPS:
                found[n] = fidelity(model)

        prefixes = ctx.space.prefixes(np.array([int(c) for c in mask]))
        with torch.random.fork_rng():
            finetune(ctx.base, ctx.model_splits.finetune_set(), prefixes, cfg, checkpoint)
        cells = " | ".join(f"{found[s]:.2f}" for s in STEPS)
        lines.append(f"| {entry.name} | {mask} | {base:.2f} | {cells} | {ceiling:.2f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    cfg = load_config("bench3")
    entries = {e.name: e for e in suite(cfg)}
    steps = " | ".join(f"{s} steps" for s in STEPS)
    print(f"| task | mask | base | {steps} | held-out images (ceiling) |")
    print("|---|---|---|" + "---|" * len(STEPS) + "---|", flush=True)
    for task, best in (HELDOUT_TASKS if "--heldout" in sys.argv else TASKS).items():
        probe_task(entries[task], best)
    print(f"\nbench3 config hash {cfg.hash()}; 64 samples per cell, DDIM 20 steps, seed 0")


if __name__ == "__main__":
    main()
