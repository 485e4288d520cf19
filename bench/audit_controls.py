"""The audit's controls on the embedded default, for the README: must fire, must not fire.

1. Positive: the default task's base model fine-tuned on every parameter for ``--steps`` steps
   (its 4 canaries x100 among 64 private images), audited with the canaries as ``--train`` and
   with the whole private set as ``--train``.
2. Negative: the base model, and the fine-tuned model, audited on two disjoint halves of
   held-out images neither saw.
3. The base model on 128 of its own pretraining images (MNIST digits of the v2 mix) against 128
   MNIST digits it never saw.

Each audit runs ``python -m memrl.audit`` as a user would; figures go to ``--out`` and a summary
table is printed.

    OMP_NUM_THREADS=1 python bench/audit_controls.py --out bench/results/audit_controls
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from memrl.config import load_config
from memrl.context import TaskContext, full_unet
from memrl.data import bundled
from memrl.data.bundled import base_count, reserved_order
from memrl.finetune import finetune

GATES = ("mia_tpr=0.1", "extracted=0")


def to_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None) -> Path:
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()[:, 0]
    np.savez(path, images=u8, **({"labels": labels.numpy()} if labels is not None else {}))
    return path


def audit(model: Path, train: Path, heldout: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "memrl.audit", "--model", str(model), "--train", str(train)]
    cmd += ["--heldout", str(heldout), "--out", str(out), "--fail-above", *GATES, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr[-2000:])
    record = json.loads((out / "audit.json").read_text())
    return {"exit": proc.returncode, **record["results"]["model"], "strongest": record["strongest_attack"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/audit_controls"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("default", {"finetune.steps": args.steps})
    ctx = TaskContext.get(full_unet(cfg))
    splits = ctx.splits
    model, _ = finetune(ctx.base, splits.finetune_set(), ctx.space.prefixes(np.ones(ctx.space.k)), ctx.cfg)
    model.save(out / "finetuned")
    ctx.base.save(out / "base")
    held = splits.heldout
    to_npz(out / "canaries.npz", splits.canaries.images, splits.canaries.labels)
    to_npz(out / "private.npz", splits.private.images, splits.private.labels)
    to_npz(out / "heldout.npz", held.images, held.labels)
    to_npz(out / "held_a.npz", held.images[:64], held.labels[:64])
    to_npz(out / "held_b.npz", held.images[64:], held.labels[64:])
    mnist = bundled("mnist", 16)
    order = reserved_order("mnist", len(mnist))
    seen, unseen = order[:128], order[base_count("mnist", len(mnist)) :][:128]
    to_npz(out / "mnist_seen.npz", mnist.images[seen], mnist.labels[seen])
    to_npz(out / "mnist_unseen.npz", mnist.images[unseen], mnist.labels[unseen])
    runs = {
        "positive: canaries": ("finetuned", "canaries.npz", "heldout.npz", "--reference", str(out / "base")),
        "positive: whole private set": (
            "finetuned",
            "private.npz",
            "heldout.npz",
            "--reference",
            str(out / "base"),
        ),
        "negative: base, unseen halves": ("base", "held_a.npz", "held_b.npz"),
        "negative: fine-tuned, unseen halves": ("finetuned", "held_a.npz", "held_b.npz"),
        "base on its pretraining digits": ("base", "mnist_seen.npz", "mnist_unseen.npz"),
    }
    rows = []
    for name, (model_dir, train, heldout, *extra) in runs.items():
        r = audit(
            out / model_dir,
            out / train,
            out / heldout,
            out / name.replace(" ", "_").replace(":", "").replace(",", ""),
            *extra,
        )
        rows.append((name, r))
    print(
        f"| control ({args.steps} steps, gates {' '.join(GATES)}) | exit | AUC [95%] "
        "| TPR at 5% FPR [95%] | PIA TPR | near copies | extracted | strongest |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        auc, tpr = r["mia_auc_ci"], r["mia_tpr_ci"]
        print(
            f"| {name} | {r['exit']} | {r['mia_auc']:.3f} [{auc[0]:.3f}, {auc[1]:.3f}] | {r['mia_tpr']:.3f} "
            f"[{tpr[0]:.3f}, {tpr[1]:.3f}] | {r['mia_tpr_pia']:.3f} | {r['near_copy_fraction']:.3f} | "
            f"{r['extracted']:.0f} | {r['strongest']} |"
        )


if __name__ == "__main__":
    main()
