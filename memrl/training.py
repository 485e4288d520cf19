"""The denoiser training loop shared by base-model pretraining and masked fine-tuning: seeded,
deterministic on CPU, DDPM epsilon loss, stops (does not raise) on a non-finite loss."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from memrl.data import ImageSet
from memrl.errors import ConfigError

if TYPE_CHECKING:
    from memrl.models.unet import DiffusionModel

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    wall_time: float = 0.0
    diverged: bool = False
    stop_reason: str | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return float(sum(tail) / len(tail)) if tail else float("nan")


def noise_scheduler(model: Any, kind: str = "ddpm") -> Any:
    """The noise schedule of ``model`` for training and evaluation losses (``ddpm``) or sampling
    (``ddim``): a pipeline's own scheduler config, else diffusers' default 1000-step schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    config = getattr(model, "scheduler_config", None)
    if config:
        return cls.from_config(config)
    return cls(num_train_timesteps=model.unet.config.get("num_train_timesteps", 1000))


def train_denoiser(
    model: DiffusionModel,
    data: ImageSet,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    cond_dropout: float = 0.1,
    seed: int = 0,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    cosine: bool = False,
    desc: str = "fine-tune",
    mixed_precision: str | None = None,
) -> FinetuneResult:
    """Train the parameters of ``model`` that require grad; seeded and deterministic on CPU.

    ``mixed_precision`` (``fp16`` or ``bf16``) runs the forward pass under autocast. Stops early
    (``diverged=True``) on a non-finite loss instead of raising.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    result = FinetuneResult(
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.unet.parameters()),
    )
    if not params or steps == 0:
        return result
    start = time.perf_counter()
    sched = noise_scheduler(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    lr_at = (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))) if cosine else (lambda i: 1.0)
    g = torch.Generator().manual_seed(seed)
    labels_all = model.labels_or_null(data.labels, len(data))
    device = next(model.parameters()).device
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        x0 = data.images[idx]
        labels = labels_all[idx].clone()
        drop = torch.rand(batch_size, generator=g) < cond_dropout
        labels[drop] = model.null_label
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        x0, noise, t, labels = x0.to(device), noise.to(device), t.to(device), labels.to(device)
        xt = sched.add_noise(x0, noise, t)
        with _autocast(device, mixed_precision):
            prediction = model(xt, t, labels)
        loss = (prediction.float() - noise).square().mean()
        if not torch.isfinite(loss):
            result.diverged, result.stop_reason = True, f"non-finite loss at step {step}"
            log.warning("%s: %s; stopping early", desc, result.stop_reason)
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        result.losses.append(loss.item())
    model.eval()
    result.wall_time = time.perf_counter() - start
    return result


def _autocast(device: torch.device, mixed_precision: str | None) -> Any:
    import contextlib

    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device={name!r} but torch sees no GPU; use finetune.device=cpu")
    return torch.device(name)
