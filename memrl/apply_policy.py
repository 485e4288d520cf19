"""Reuse a trained policy on a new dataset: no new search.

    python -m memrl.apply_policy --policy runs/RUN/policy.zip --data my_images/ --out results/
    python -m memrl.apply_policy --policy runs/RUN --data set.npz --candidates 4 --budget 4

Checks the policy card against the base model's search space, computes the dataset descriptor,
takes the policy's mask (or evaluates its top candidates and keeps the best), then delivers a
model: a fine-tune with that mask on *all* the user's images except a held-out split (sized from
the data; no canaries, no duplication), saved as a plain diffusers folder (safetensors), and a
report of its memorization (near-copies calibrated on the held-out images, extraction, the
train/held-out loss gap) and quality beside full fine-tuning of every parameter under the same
protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from memrl.cli import run_main
from memrl.config import Config, dump_config, load_config, parse_overrides
from memrl.errors import MemrlError
from memrl.utils import atomic_write_text, package_versions, setup_logging

log = logging.getLogger("memrl.apply_policy")

REPORT_METRICS = (
    "near_copy_fraction",
    "extracted",
    "loss_gap",
    "nn_similarity_mean",
    "kid",
    "fid",
    "heldout_loss",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.apply_policy",
        description="Propose a fine-tuning mask for a new dataset with a trained policy, and apply it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--policy", type=Path, required=True, help="policy.zip or the run directory")
    parser.add_argument(
        "--data", required=True, help="a folder of images (+ captions.csv), an .npz, or a bundled name"
    )
    parser.add_argument("--out", type=Path, default=Path("memrl-apply"), help="results folder")
    parser.add_argument("--candidates", type=int, default=1, help="consider the N most probable masks")
    parser.add_argument("--budget", type=int, default=0, help="short evaluations to pick among candidates")
    parser.add_argument(
        "--steps", type=int, default=None, help="final fine-tune steps (default: 2 x finetune.steps)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def choose_mask(
    policy: Any, task: Any, candidates: int, budget: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The policy's best mask; with a budget, the best-rewarded of its top candidates."""
    masks = policy.candidates(task.descriptor(), max(candidates, 1))
    if budget <= 0 or len(masks) == 1:
        return masks[0], []
    tried = []
    for mask in masks[:budget]:
        outcome = task.score(mask)
        tried.append({"mask": mask.tolist(), "reward": outcome.reward, "ok": outcome.ok})
    best = max(range(len(tried)), key=lambda i: tried[i]["reward"])
    return masks[best], tried


def delivery_config(cfg: Config, n_images: int, steps: int) -> Config:
    """The delivered model's protocol: every image but a held-out split (a fifth, 4 at least, at most
    ``data.heldout_size``), no canaries, no duplication, ``steps`` fine-tune steps."""
    heldout = min(cfg.data.heldout_size, max(4, n_images // 5))
    data = dataclasses.replace(
        cfg.data, private_size=n_images - heldout, heldout_size=heldout, canaries=0, duplication=1
    )
    return load_config(cfg, {"data": dataclasses.asdict(data), "finetune.steps": steps})


def deliver(cfg: Config, mask: np.ndarray, out: Path | None, store: Any) -> Any:
    """Fine-tune with ``mask`` under ``cfg``, score it, store the evaluation; save the merged model
    to ``out`` when given."""
    from memrl.peft_methods import merge_adapters
    from memrl.scoring import finetune_and_score
    from memrl.task import TaskContext

    ctx = TaskContext.get(cfg)
    try:
        model, result = finetune_and_score(ctx, mask)
    except FloatingPointError as exc:
        raise MemrlError(f"the final fine-tune of mask {''.join(map(str, mask))} failed: {exc}") from None
    store.put(result, ctx.spec(mask))
    if out is not None:
        merge_adapters(model.unet)
        model.save(out)
    return result


def apply(args: argparse.Namespace) -> Path:
    from memrl.agents.policy import load_policy
    from memrl.data import fit_sizes, usable_count
    from memrl.store import EvaluationStore
    from memrl.task import Task, TaskContext, architecture_space, make_evaluator

    policy = load_policy(args.policy)
    overrides: dict[str, Any] = {
        "data.source": args.data,
        "env.tasks": [],
        "env.table": None,
        "env.backend": "inprocess",
        "env.store": str((args.out / "evaluations.sqlite").resolve()),
    }
    overrides.update(parse_overrides(args.set))
    cfg = load_config(policy.config, overrides)
    n_images = usable_count(cfg.data)
    search_cfg = load_config(cfg, {"data": dataclasses.asdict(fit_sizes(cfg.data, n_images))})
    task = Task(search_cfg, make_evaluator(search_cfg), name=str(args.data))
    policy.check_space(task.space)
    args.out.mkdir(parents=True, exist_ok=True)
    mask, tried = choose_mask(policy, task, args.candidates, args.budget)
    steps = args.steps if args.steps is not None else 2 * cfg.finetune.steps
    final_cfg = delivery_config(cfg, n_images, steps)
    dump_config(final_cfg, args.out / "config.yaml")
    log.info("mask %s: %s", "".join(map(str, mask)), task.space.selected(mask))
    store = EvaluationStore(cfg.env.store)
    chosen = deliver(final_cfg, mask, args.out / "model", store)
    # The comparison is true full fine-tuning: every group at block granularity = every parameter.
    whole = load_config(final_cfg, {"search.granularity": "block", "search.method": "full"})
    full = deliver(whole, np.ones(architecture_space(whole).k, dtype=np.int8), None, store)
    keys = (*REPORT_METRICS, "trainable_fraction")
    result = {
        "mask": mask.tolist(),
        "groups": task.space.selected(mask),
        "candidates_tried": tried,
        "descriptor": task.descriptor().tolist(),
        "images": n_images,
        "finetuned_on": final_cfg.data.private_size,
        "heldout": final_cfg.data.heldout_size,
        "chosen": {k: chosen.metrics[k] for k in keys},
        "full_finetune": {k: full.metrics[k] for k in keys},
        "final_steps": steps,
        "seed": final_cfg.seed,
        "data_fingerprint": TaskContext.get(final_cfg).fingerprints["data"],
        "policy": str(args.policy),
        "policy_config_hash": policy.card["config_hash"],
        "versions": package_versions(),
    }
    atomic_write_text(args.out / "result.json", json.dumps(result, indent=2))
    rows = "\n".join(f"| {k} | {chosen.metrics[k]:.4f} | {full.metrics[k]:.4f} |" for k in keys)
    report = (
        f"# memrl apply: {args.data}\n\nPolicy `{args.policy}` proposed mask "
        f"`{''.join(map(str, mask))}` = {', '.join(task.space.selected(mask)) or '(none)'}.\n"
        f"Delivered model: {steps} fine-tune steps on {final_cfg.data.private_size} of the {n_images} "
        f"images ({final_cfg.data.heldout_size} held out to measure memorization and quality); saved to "
        f"`model/` (diffusers UNet, safetensors).\n\n"
        f"| metric | chosen mask | full fine-tune (every parameter) |\n|---|---|---|\n{rows}\n\n"
        "near_copy_fraction: share of samples closer to a training image than 99% of held-out images "
        "are; loss_gap: held-out minus training denoising loss (a membership signal); extracted: "
        "training images reproduced by a clique of samples.\n"
    )
    atomic_write_text(args.out / "report.md", report)
    return args.out


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def body() -> int:
        out = apply(args)
        print(f"results: {out / 'report.md'}")
        return 0

    return run_main(body, interrupted=f"evaluations so far are stored in {args.out / 'evaluations.sqlite'}")


if __name__ == "__main__":
    sys.exit(main())
