"""One evaluation on a GPU, and several at once: the figures of the scale-out issue, in one run.

    python bench/bench_gpu.py                 # on a machine with CUDA; writes $OUT/bench_gpu.json
    python bench/bench_gpu.py --device cpu --config test --workers 1 2   # the code paths, on a CPU

1. Agreement: the mask of ones evaluated on the CPU, on CUDA (eager steps) and on CUDA with
   ``finetune.cuda_graph=true``, for the test config and the embedded default; every metric side
   by side with its largest relative difference to the CPU.
2. One evaluation of the default in a warm process, eager against CUDA graph: seconds per stage
   (fine-tune, losses, sampling, metrics), mean of 3 evaluations each (computed, no store).
3. Throughput: evaluations per hour of the default with 1, 4 and 8 worker processes sharing the
   GPU (each warm first), ratio to one worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch

from memrl.config import load_config
from memrl.scoring import evaluate_spec
from memrl.task import TaskContext

KEYS = (
    "heldout_loss",
    "canary_loss_gap",
    "canary_copy_fraction",
    "kid",
    "fid",
    "noise_norm_canary",
    "finetune_loss",
)
MODES = {"cpu": {"finetune.device": "cpu"}}
OUT = Path(os.environ.get("OUT", "."))
report: dict = {}


def save() -> None:
    (OUT / report.get("json", "bench_gpu.json")).write_text(json.dumps(report, indent=2))


def spec(config: str, mode: str):
    cfg = load_config(config, MODES[mode])
    ctx = TaskContext.get(cfg)
    return ctx.spec(np.ones(ctx.space.k, int))


def agreement(config: str) -> None:
    rows = {}
    for mode in MODES:
        ev = evaluate_spec(spec(config, mode))
        assert ev.ok, ev.error
        rows[mode] = {k: ev.metrics.get(k, float("nan")) for k in KEYS} | {"total_s": ev.timings["total"]}
    for mode in ("cuda", "cuda_graph"):
        rows[f"{mode}_max_rel_diff_to_cpu"] = max(
            abs(rows[mode][k] - rows["cpu"][k]) / max(abs(rows["cpu"][k]), 1e-8) for k in KEYS
        )
    report[f"agreement_{config}"] = rows
    print(config, json.dumps(rows, indent=1), flush=True)
    save()


def one_evaluation(config: str) -> None:
    rows = {}
    for mode in ("cuda", "cuda_graph"):
        evaluate_spec(spec(config, mode))  # warm-up
        evs = [evaluate_spec(spec(config, mode)) for _ in range(3)]
        rows[mode] = {k: float(np.mean([ev.timings[k] for ev in evs])) for k in evs[0].timings}
        print(mode, rows[mode], flush=True)
    report[f"one_evaluation_{config}"] = rows
    save()


def _init(threads: int, ready, config: str, modes: dict) -> None:
    torch.set_num_threads(threads)
    MODES.update(modes)
    ev = evaluate_spec(spec(config, "cuda_graph"))  # imports, CUDA, cuDNN and the task context warm
    assert ev.ok, ev.error
    with ready.get_lock():
        ready.value += 1


def _evaluate(config: str) -> bool:
    return evaluate_spec(spec(config, "cuda_graph")).ok


def throughput(config: str, counts: list[int]) -> None:
    cores = os.cpu_count() or 1
    rows, first = [], None
    for workers in counts:
        threads = max(1, cores // workers)
        evals = max(4, 3 * workers)
        context = mp.get_context("spawn")
        ready = context.Value("i", 0)
        with context.Pool(workers, initializer=_init, initargs=(threads, ready, config, MODES)) as pool:
            waited = time.perf_counter()
            while ready.value < workers:  # every worker warm before the clock starts
                if time.perf_counter() - waited > 300:
                    raise TimeoutError("workers did not warm up in 300 s")
                time.sleep(0.2)
            start = time.perf_counter()
            ok = pool.map(_evaluate, [config] * evals, chunksize=1)
            seconds = time.perf_counter() - start
        rate = evals / seconds * 3600
        first = first or rate
        rows.append(
            {"workers": workers, "threads": threads, "evals": evals, "ok": sum(ok), "seconds": seconds}
            | {"evals_per_hour": rate, "ratio": rate / first}
        )
        print(rows[-1], flush=True)
        report[f"throughput_{config}"] = rows
        save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", help="the device of the non-CPU modes")
    parser.add_argument("--config", default="default", help="config of parts 2 and 3")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--parts", nargs="+", choices=("agreement", "one", "throughput"))
    parser.add_argument("--json", default="bench_gpu.json", help="file name under $OUT")
    args = parser.parse_args()
    report["json"] = args.json
    MODES["cuda"] = {"finetune.device": args.device}
    MODES["cuda_graph"] = {"finetune.device": args.device, "finetune.cuda_graph": True}
    report["torch"] = torch.__version__
    report["device"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    report["cpu_cores"] = os.cpu_count()
    chosen = set(args.parts or ("agreement", "one", "throughput"))
    parts = [lambda: agreement("test")] if "agreement" in chosen else []
    parts += [lambda: one_evaluation(args.config)] if "one" in chosen else []
    parts += [lambda: agreement(args.config)] if "agreement" in chosen and args.config != "test" else []
    parts += [lambda: throughput(args.config, args.workers)] if "throughput" in chosen else []
    for part in parts:
        start = time.perf_counter()
        try:
            part()
        except Exception as exc:  # one part failing still reports the others
            report.setdefault("errors", []).append(repr(exc)[:2000])
            print("FAILED:", repr(exc)[:2000], flush=True)
        print(f"part done in {time.perf_counter() - start:.0f} s", flush=True)
    save()


if __name__ == "__main__":
    main()
