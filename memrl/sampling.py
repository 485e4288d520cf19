"""DDIM sampling with classifier-free guidance."""

from __future__ import annotations

from typing import Any

import torch

from memrl.models.unet import DiffusionModel
from memrl.training import noise_scheduler

__all__ = ["sample"]


@torch.no_grad()
def sample(
    model: DiffusionModel,
    labels: torch.Tensor,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Generate one image in [-1, 1] per label with DDIM (unknown labels and -1 sample
    unconditionally). ``guidance`` is the classifier-free guidance scale (1 = no guidance).

    A chunk whose every label is the null label runs the UNet once per step instead of on a
    doubled batch: its conditional and unconditional predictions are the same, so the guided noise
    is the unconditional prediction. On the CPU kernels the result is bit for bit the doubled
    batch's (``tests/test_models.py`` checks it; ``bench/bench_sampling.py`` measures the time and
    re-evaluates stored rows); other devices may pick other kernels for the other batch size."""

    labels = model.labels_or_null(labels, len(labels))
    sched: Any = noise_scheduler(model, "ddim")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    shape = (model.channels, model.resolution, model.resolution)
    device = next(model.parameters()).device
    out = []
    for chunk in labels.split(batch_size):
        x = torch.randn((len(chunk), *shape), generator=g).to(device)
        chunk = chunk.to(device)
        null = torch.full_like(chunk, model.null_label)
        unconditional = bool((chunk == null).all())
        for t in sched.timesteps:
            if unconditional:
                eps = model(x, t.expand(len(chunk)).to(device), chunk)
            else:
                tt = t.expand(2 * len(chunk)).to(device)
                eps_cond, eps_uncond = model(torch.cat([x, x]), tt, torch.cat([chunk, null])).chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = sched.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
