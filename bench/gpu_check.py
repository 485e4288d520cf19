"""One short check of the GPU path (run on a machine with CUDA):

1. the same evaluation of the tiny test config on CPU and on CUDA (metrics side by side);
2. the embedded default on CUDA: base-model pretraining time and one uncached env step;
3. a few PPO steps of ``python -m memrl.train_agent`` with ``finetune.device=cuda``.

Writes ``$OUT/gpu_check.json`` (or ./gpu_check.json) and prints a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memrl.config import load_config
from memrl.scoring import evaluate_spec
from memrl.task import TaskContext

KEYS = ("heldout_loss", "canary_loss_gap", "canary_copy_fraction", "kid", "noise_norm_canary")


def evaluate(cfg, mask):
    return evaluate_spec(TaskContext.get(cfg).spec(mask))


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "."))
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.get_device_name(0)}
    print(report, flush=True)

    for device in ("cpu", "cuda"):
        cfg = load_config("test", {"finetune.device": device})
        ev = evaluate(cfg, np.ones(4, int))
        report[f"test_{device}"] = {k: ev.metrics[k] for k in KEYS} | {"total_s": ev.timings["total"]}
        print(device, report[f"test_{device}"], flush=True)

    cfg = load_config("default", {"finetune.device": "cuda"})
    start = time.perf_counter()
    ctx = TaskContext.get(cfg)
    _ = ctx.base, ctx.encoder  # loads the shipped base UNet and trains the encoder on this machine
    report["default_context_s"] = time.perf_counter() - start
    for label, mask in (
        ("full", np.ones(ctx.space.k, int)),
        ("mid", ctx.space.mask_from_groups(["mid_block.attentions.0"])),
    ):
        ev = evaluate(cfg, mask)
        report[f"default_{label}"] = {k: ev.metrics[k] for k in KEYS} | {
            k: round(v, 2) for k, v in ev.timings.items()
        }
        print(label, report[f"default_{label}"], flush=True)

    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memrl.train_agent",
            "--config",
            "test",
            "--run-dir",
            str(out_dir / "run"),
            "--set",
            "finetune.device=cuda",
            "ppo.total_timesteps=8",
            "ppo.n_steps=4",
            "--no-report",
        ],
        capture_output=True,
        text=True,
    )
    report["train_agent_cuda"] = {
        "exit": proc.returncode,
        "seconds": time.perf_counter() - start,
        "stderr_tail": proc.stderr[-800:],
    }
    print(report["train_agent_cuda"], flush=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
