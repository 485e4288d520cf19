"""Unconditional sampling with one UNet pass per step against the guided two-branch loop.

Most suite-v2 sources have no labels, so every sample is unconditional and classifier-free
guidance's two branches are the same tensor. ``memrl.sampling.sample`` then runs the UNet once per
step. This script times both on the bench base model (64 samples x 20 DDIM steps, as an
evaluation samples) and re-evaluates stored rows of unconditional tasks to check that their
metrics come out exactly as stored (the table build's rows must not change).

    python bench/bench_sampling.py [--threads 1] [--recheck 2] [--table PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import time

import numpy as np
import torch

from memrl.config import load_config
from memrl.context import TaskContext, task_config
from memrl.sampling import sample
from memrl.scoring import evaluate_spec
from memrl.spec import EvalSpec
from memrl.tables import table_path
from memrl.training import noise_scheduler


@torch.no_grad()
def two_branch(model, n: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The loop every stored row was sampled with: conditional and unconditional halves of one batch."""
    sched = noise_scheduler(model, "ddim")
    sched.set_timesteps(steps)
    null = torch.full((n,), model.null_label)
    x = torch.randn(
        (n, model.channels, model.resolution, model.resolution), generator=torch.Generator().manual_seed(seed)
    )
    for t in sched.timesteps:
        cond, uncond = model(torch.cat([x, x]), t.expand(2 * n), torch.cat([null, null])).chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1)


def recheck(table: str, count: int) -> None:
    """Re-evaluate ``count`` stored rows of unconditional tasks and say which metrics differ."""
    with sqlite3.connect(f"file:{table}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT spec_hash, spec, metrics FROM evaluations WHERE ok = 1 AND spec IS NOT NULL"
        ).fetchall()
    rng = np.random.default_rng(0)
    done = 0
    for i in rng.permutation(len(rows)):
        spec_hash, spec_json, metrics_json = rows[i]
        spec = EvalSpec.from_json(spec_json)
        if spec.settings["data"]["source"] == "digits" or not any(spec.mask):
            continue  # labelled (guided) or no fine-tune: the shortcut is not what they test
        start = time.perf_counter()
        fresh = evaluate_spec(spec).metrics
        stored = json.loads(metrics_json)
        differ = [
            k
            for k in stored
            if not (stored[k] == fresh.get(k) or (math.isnan(stored[k]) and math.isnan(fresh.get(k, 0.0))))
        ]
        name = f"{spec.settings['data']['source']}, data seed {spec.settings['data']['seed']}"
        if not differ:
            verdict = "all identical"
        else:
            worst = max(abs(fresh[k] - stored[k]) / max(abs(stored[k]), 1e-12) for k in differ)
            cause = (
                " (its fine-tune loss already differs: not the sampling)" if "finetune_loss" in differ else ""
            )
            verdict = f"{len(differ)} differ, by at most {worst:.1e} relative{cause}"
        seconds = time.perf_counter() - start
        mask = "".join(map(str, spec.mask))
        print(f"{spec_hash} ({name}, mask {mask}): {len(stored)} metrics, {verdict} ({seconds:.0f} s)")
        done += 1
        if done == count:
            return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the table build's workers use 1)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recheck", type=int, default=2, help="stored rows to re-evaluate (0: none)")
    parser.add_argument("--table", default=str(table_path("bench")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = task_config(load_config("bench"), "hubble")
    model, s = TaskContext.get(cfg).base, cfg.sample
    model.eval()
    labels = torch.full((s.num_samples,), -1)
    times: dict[str, list[float]] = {"two branches": [], "one branch": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        t0 = time.perf_counter()
        ref = two_branch(model, s.num_samples, s.steps, s.guidance, seed=0)
        t1 = time.perf_counter()
        fast = sample(model, labels, steps=s.steps, guidance=s.guidance, seed=0)
        t2 = time.perf_counter()
        times["two branches"].append(t1 - t0)
        times["one branch"].append(t2 - t1)
        assert torch.equal(ref, fast), "the one-branch samples differ from the two-branch ones"
    base = float(np.median(times["two branches"]))
    print(f"{s.num_samples} unconditional samples x {s.steps} DDIM steps, {args.threads} thread(s), ", end="")
    print(f"median of {args.repeats}:")
    print("| loop | seconds | ratio |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts):.2f} | {np.median(ts) / base:.2f} |")
    print("samples identical bit for bit: yes")
    if args.recheck:
        recheck(args.table, args.recheck)


if __name__ == "__main__":
    main()
