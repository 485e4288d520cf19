"""Stable Diffusion fine-tuning cost: memrl's masked fine-tune against a plain diffusers training
step (the loop of diffusers' ``train_text_to_image`` example, which the MemControl reference builds
on), side by side in one run, on a random-weight pipeline built offline.

    python bench/bench_sd.py --size sd15 --device cuda      # SD 1.5's architecture, 512 px, batch 8
    python bench/bench_sd.py --size tiny                    # every code path on a CPU, in seconds

Prints seconds per step and peak memory for: the diffusers baseline (VAE + text encoder + UNet
each step, as the example; and on cached latents), memrl's full fine-tuning (every UNet
parameter), the 16-group mask of ones, two sparse masks, and each PEFT method on all groups, with
and without mixed precision and gradient checkpointing. Writes ``$OUT/bench_sd.json`` if ``OUT``
is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memrl.config import load_config
from memrl.data import ImageSet
from memrl.finetune import finetune
from memrl.models.stable_diffusion import (
    TextConditionedModel,
    build_random_pipeline,
    encode_prompts,
    load_components,
)
from memrl.search_space import SearchSpace


def peak_memory_gb(device: str) -> float:
    """Peak memory since the last :func:`reset_peak` (GPU), or of the process so far (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def baseline_step_time(parts, images, ids, steps, device, precision, cached: bool) -> float:
    """diffusers' train_text_to_image inner loop: encode, noise, predict, MSE, AdamW."""
    from diffusers import DDPMScheduler

    unet = parts.unet.to(device).train().requires_grad_(True)
    vae, text = parts.vae.to(device), parts.text_encoder.to(device)
    sched = DDPMScheduler.from_pretrained(parts.path / "scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad():
        fixed_latents = vae.encode(images.to(device)).latent_dist.sample() * vae.config.scaling_factor
        fixed_text = text(ids.to(device))[0]
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            if cached:
                latents, hidden = fixed_latents, fixed_text
            else:
                latents = vae.encode(images.to(device)).latent_dist.sample() * vae.config.scaling_factor
                hidden = text(ids.to(device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            pred = unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    unet.requires_grad_(False)
    return float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--only", nargs="+", help="run only the memrl cases whose label has one of these (and the baselines)"
    )
    args = parser.parse_args()
    side = 16 if args.size == "tiny" else 512
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_random_pipeline(Path(tmp) / "pipe", args.size)
        parts = load_components(str(folder))
        images = torch.rand(args.batch, 3, side, side) * 2 - 1
        ids = parts.tokenizer(
            ["a photo of a chest x-ray"] * args.batch,
            padding="max_length",
            max_length=parts.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        rows = []
        for precision in ("no", "bf16"):
            for cached in (False, True):
                reset_peak(args.device)
                seconds = baseline_step_time(parts, images, ids, args.steps, args.device, precision, cached)
                label = f"diffusers train_text_to_image step{' (cached latents)' if cached else ''}"
                rows.append(
                    {
                        "case": label,
                        "precision": precision,
                        "checkpointing": False,
                        "trainable %": 100.0,
                        "s/step": seconds,
                        "peak GB": peak_memory_gb(args.device),
                    }
                )
                print(rows[-1], flush=True)
        with torch.no_grad():
            latents = parts.vae.to("cpu").encode(images).latent_dist.mean * parts.vae.config.scaling_factor
        model = TextConditionedModel(
            parts.unet.cpu(), encode_prompts(parts, ["a photo of a chest x-ray", ""]), folder
        )
        data = ImageSet(latents, torch.zeros(args.batch, dtype=torch.long), None, "bench")
        block, transformer = SearchSpace(parts.unet, "block"), SearchSpace(parts.unet, "transformer")
        names = transformer.names
        cases = [
            ("full fine-tuning (every parameter)", "block", "full", np.ones(block.k, int)),
            (f"mask of ones ({transformer.k} groups)", "transformer", "full", np.ones(transformer.k, int)),
            (
                f"sparse: {names[len(names) // 2]}",
                "transformer",
                "full",
                transformer.mask_from_groups([names[len(names) // 2]]),
            ),
            (f"sparse: {names[-1]}", "transformer", "full", transformer.mask_from_groups([names[-1]])),
        ]
        cases += [
            (f"{m} (all groups)", "transformer", m, np.ones(transformer.k, int))
            for m in ("attention", "bias_norm", "difffit", "lora", "svdiff")
        ]
        cases = [c for c in cases if not args.only or any(word in c[0] for word in args.only)]
        for label, granularity, method, mask in cases:
            space = block if granularity == "block" else transformer
            settings = [("no", False), ("bf16", False)] + (
                [("bf16", True)] if "every parameter" in label else []
            )
            for precision, checkpointing in settings:
                cfg = load_config(
                    "test",
                    {
                        "finetune.steps": args.steps + 1,
                        "finetune.batch_size": args.batch,
                        "finetune.lr": 1e-5,
                        "finetune.device": args.device,
                        "finetune.mixed_precision": precision,
                        "finetune.gradient_checkpointing": checkpointing,
                        "search.method": method,
                        "search.granularity": granularity,
                    },
                )
                reset_peak(args.device)
                tuned, result = finetune(model, data, space.prefixes(mask), cfg)
                del tuned  # frees its weights and optimizer state before the next case
                seconds = (result.wall_time - result.first_step_time) / args.steps  # the first step warms up
                rows.append(
                    {
                        "case": f"memrl: {label}",
                        "precision": precision,
                        "checkpointing": checkpointing,
                        "trainable %": 100 * result.trainable_fraction,
                        "s/step": seconds,
                        "peak GB": peak_memory_gb(args.device),
                    }
                )
                print(rows[-1], flush=True)
    # memrl fine-tunes on cached latents: its baseline is diffusers' step on cached latents, same precision
    base = {r["precision"]: r["s/step"] for r in rows if "cached" in r["case"]} or {"no": 1.0, "bf16": 1.0}
    print(f"\n{args.size}, {args.device}, batch {args.batch}, {side} px, {args.steps} timed steps")
    print(
        "| case | precision | checkpointing | trainable % | s/step | ratio to diffusers (cached) | peak GB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['precision']} | {r['checkpointing']} | {r['trainable %']:.2f} | "
            f"{r['s/step']:.3f} | {r['s/step'] / base[r['precision']]:.2f} | {r['peak GB']:.1f} |"
        )
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "bench_sd.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
