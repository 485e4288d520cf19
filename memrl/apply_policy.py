"""Reuse a trained policy on a new dataset: no new search.

    python -m memrl.apply_policy --policy runs/RUN/policy.zip --data my_images/ --out results/
    python -m memrl.apply_policy --policy runs/RUN --data set.npz --candidates 4 --budget 4

Checks the policy card against the base model's search space, computes the dataset descriptor,
takes the policy's mask (or evaluates its top candidates and keeps the best), runs a longer final
fine-tune with it, saves the fine-tuned UNet (a plain diffusers folder, safetensors) and writes a
report comparing it with full fine-tuning on the same data.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config, ConfigError, dump_config, load_config, parse_overrides
from memrl.data import DataError
from memrl.models import ModelError
from memrl.utils import atomic_write_text, package_versions, setup_logging

log = logging.getLogger("memrl.apply_policy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.apply_policy",
        description="Propose a fine-tuning mask for a new dataset with a trained policy, and apply it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--policy", type=Path, required=True, help="policy.zip or the run directory")
    parser.add_argument("--data", required=True, help="a folder of images (+ captions.csv) or an .npz")
    parser.add_argument("--out", type=Path, default=Path("memrl-apply"), help="results folder")
    parser.add_argument("--candidates", type=int, default=1, help="consider the N most probable masks")
    parser.add_argument("--budget", type=int, default=0, help="short evaluations to pick among candidates")
    parser.add_argument(
        "--steps", type=int, default=None, help="final fine-tune steps (default: 2 x finetune.steps)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def choose_mask(policy, env, candidates: int, budget: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The policy's best mask; with a budget, the best-rewarded of its top candidates."""
    masks = policy.candidates(env.dataset_descriptor, max(candidates, 1))
    if budget <= 0 or len(masks) == 1:
        return masks[0], []
    tried = []
    for mask in masks[:budget]:
        reward, info = env.evaluate_mask(mask)
        tried.append({"mask": mask.tolist(), "reward": reward, "ok": info["ok"]})
    best = max(range(len(tried)), key=lambda i: tried[i]["reward"])
    return masks[best], tried


def final_finetune(cfg: Config, mask: np.ndarray, out: Path, label: str):
    """Fine-tune with ``mask``, score it, store the evaluation; save the model if ``label`` is set."""
    from memrl.evaluate import EvalSpec, TaskContext, score_model
    from memrl.finetune import finetune
    from memrl.peft_methods import merge_adapters
    from memrl.store import EvaluationStore

    ctx = TaskContext.get(cfg)
    spec = EvalSpec.from_config(cfg, mask, ctx.fingerprints)
    store = EvaluationStore(cfg.env.store)
    model, ft = finetune(ctx.base, ctx.splits.finetune_set(), ctx.space.prefixes(mask), cfg)
    if ft.diverged:
        raise RuntimeError(f"the final fine-tune diverged ({ft.stop_reason}); lower finetune.lr")
    merge_adapters(model.unet)
    if label:
        model.save(out / label)
    result = score_model(model, ctx, cfg, mask, spec.hash)
    result.metrics.update(
        trainable_params=float(ft.trainable_params),
        trainable_fraction=ft.trainable_fraction,
        finetune_loss=ft.final_loss,
    )
    result.timings["finetune"] = ft.wall_time
    store.put(result, spec)
    return result, ctx


def apply(args: argparse.Namespace) -> Path:
    from memrl.agents.policy import load_policy
    from memrl.envs.memcontrol import MemControlEnv
    from memrl.evaluate import TaskContext

    policy = load_policy(args.policy)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    overrides = {
        "data.source": args.data,
        "env.tasks": [],
        "env.store": str((out / "evaluations.sqlite").resolve()),
    }
    overrides.update(parse_overrides(args.set))
    cfg = load_config(policy.config, overrides)
    env = MemControlEnv(cfg)
    policy.check_space(env.space)
    env.reset(options={"dataset": 0})
    mask, tried = choose_mask(policy, env, args.candidates, args.budget)
    steps = args.steps if args.steps is not None else 2 * cfg.finetune.steps
    final_cfg = load_config(cfg, {"finetune.steps": steps})
    dump_config(final_cfg, out / "config.yaml")
    log.info("mask %s: %s", "".join(map(str, mask)), env.space.selected(mask))
    chosen, ctx = final_finetune(final_cfg, mask, out, "model")
    # The comparison is true full fine-tuning: every group at block granularity = every parameter.
    whole = load_config(final_cfg, {"search.granularity": "block", "search.method": "full"})
    full, _ = final_finetune(whole, np.ones(TaskContext.get(whole).space.k, dtype=np.int8), out, "")
    keys = (
        "canary_copy_fraction",
        "near_copy_fraction",
        "extracted",
        "canary_loss_gap",
        "kid",
        "fid",
        "heldout_loss",
    )
    result = {
        "mask": mask.tolist(),
        "groups": env.space.selected(mask),
        "candidates_tried": tried,
        "descriptor": env.dataset_descriptor.tolist(),
        "chosen": {k: chosen.metrics[k] for k in (*keys, "trainable_fraction")},
        "full_finetune": {k: full.metrics[k] for k in (*keys, "trainable_fraction")},
        "final_steps": steps,
        "seed": final_cfg.seed,
        "data_fingerprint": ctx.fingerprints["data"],
        "policy": str(args.policy),
        "policy_config_hash": policy.card["config_hash"],
        "versions": package_versions(),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    rows = "\n".join(
        f"| {k} | {chosen.metrics[k]:.4f} | {full.metrics[k]:.4f} |" for k in (*keys, "trainable_fraction")
    )
    report = (
        f"# memrl apply: {args.data}\n\nPolicy `{args.policy}` proposed mask "
        f"`{''.join(map(str, mask))}` = {', '.join(env.space.selected(mask)) or '(none)'}.\n"
        f"Final fine-tune: {steps} steps; model saved to `model/` (diffusers UNet, safetensors).\n\n"
        f"| metric | chosen mask | full fine-tune (every parameter) |\n|---|---|---|\n{rows}\n"
    )
    atomic_write_text(out / "report.md", report)
    return out


def main(argv: list[str] | None = None) -> int:
    from memrl.agents.policy import PolicyError

    setup_logging()
    args = parse_args(argv)
    try:
        out = apply(args)
    except (PolicyError, ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
