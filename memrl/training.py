"""The denoiser training loop shared by base-model pretraining and masked fine-tuning: seeded,
deterministic on CPU, DDPM epsilon loss, stops (does not raise) on a non-finite loss."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from memrl.data import ImageSet
from memrl.errors import ConfigError

__all__ = ["FinetuneResult", "noise_scheduler", "resolve_device", "train_denoiser"]

if TYPE_CHECKING:
    from memrl.models.unet import DiffusionModel

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    wall_time: float = 0.0
    first_step_time: float = 0.0
    """Seconds until the first step finished (warm-up included): the steady step time is
    ``(wall_time - first_step_time) / (len(losses) - 1)``."""
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
    cuda_graph: bool = False,
    on_step: Callable[[int], None] | None = None,
    params: list[torch.nn.Parameter] | None = None,
) -> FinetuneResult:
    """Train the parameters of ``model`` that require grad; seeded and deterministic on CPU.

    ``params``: the parameters the optimizer holds (default: those that require grad now); of
    these, each update trains the ones that require grad at that step, so ``on_step`` may freeze
    and unfreeze them between updates (a step with none trainable draws its batch and changes
    nothing and records no loss).

    ``on_step(n)`` runs after the ``n``-th update (1-based) of an eager run: a checkpoint can
    measure the model there (in eval mode, restored to train mode after) without changing the run.

    ``mixed_precision`` (``fp16`` or ``bf16``) runs the forward pass under autocast. Stops early
    (``diverged=True``) on a non-finite loss instead of raising. ``cuda_graph`` (CUDA only)
    replays each step as one CUDA graph: the same batches and updates without a kernel launch
    per operation or a host synchronisation per step.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    result = FinetuneResult(
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.unet.parameters()),
    )
    if not params or steps == 0:
        return result
    start = time.perf_counter()
    device = next(model.parameters()).device
    run = _Run(
        model=model,
        data=data,
        params=params,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        cond_dropout=cond_dropout,
        seed=seed,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
        cosine=cosine,
        desc=desc,
        mixed_precision=mixed_precision,
        on_step=on_step,
    )
    model.train()
    if cuda_graph and device.type == "cuda" and on_step is None:
        initial = [p.detach().clone() for p in params]
        losses = _train_graphed(run)
        first_bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if first_bad is None:
            result.losses = losses
        else:  # replay eagerly from the start so that the run stops exactly where the eager one does
            log.info("%s: non-finite loss in the CUDA graph run; replaying eagerly", desc)
            with torch.no_grad():
                for p, value in zip(params, initial):
                    p.copy_(value)
                    p.grad = None
            _train_eager(run, result, start)
    else:
        _train_eager(run, result, start)
    model.eval()
    result.wall_time = time.perf_counter() - start
    return result


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What one training run needs: the model, its data and trainable parameters, and the
    settings of :func:`train_denoiser`."""

    model: DiffusionModel
    data: ImageSet
    params: list[torch.nn.Parameter]
    steps: int
    batch_size: int
    lr: float
    cond_dropout: float
    seed: int
    grad_clip: float
    weight_decay: float
    cosine: bool
    desc: str
    mixed_precision: str | None
    on_step: Callable[[int], None] | None = None

    def batches(self) -> _Batches:
        return _Batches(self.model, self.data, self.batch_size, self.cond_dropout, self.seed)


class _Batches:
    """The seeded training batches, drawn on the CPU in a fixed order so that every device and
    code path sees the same ones: image indices, condition dropout, noise, timesteps."""

    def __init__(
        self, model: DiffusionModel, data: ImageSet, batch_size: int, cond_dropout: float, seed: int
    ):
        self.images, self.batch_size, self.cond_dropout = data.images, batch_size, cond_dropout
        self.labels = model.labels_or_null(data.labels, len(data))
        self.null_label = model.null_label
        self.generator = torch.Generator().manual_seed(seed)
        self.num_timesteps = noise_scheduler(model).config.num_train_timesteps

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch: clean images, labels (some dropped to the null label), noise, timesteps."""
        g, n = self.generator, self.batch_size
        idx = torch.randint(0, len(self.images), (n,), generator=g)
        labels = self.labels[idx].clone()
        labels[torch.rand(n, generator=g) < self.cond_dropout] = self.null_label
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.num_timesteps, (n,), generator=g)
        return x0, labels, noise, t


def _lr_factor(step: int, steps: int, cosine: bool) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0


def _train_eager(run: _Run, result: FinetuneResult, started: float) -> None:
    model, params, steps, lr, desc = run.model, run.params, run.steps, run.lr, run.desc
    sched = noise_scheduler(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=run.weight_decay)
    batches = run.batches()
    device = params[0].device
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        x0, labels, noise, t = (v.to(device) for v in batches.draw())
        if not any(p.requires_grad for p in params):  # every group frozen for now (a switchable run)
            opt.zero_grad(set_to_none=True)
            _checkpoint(run, step)
            continue
        xt = sched.add_noise(x0, noise, t)
        with _autocast(device, run.mixed_precision):
            prediction = model(xt, t, labels)
        loss = (prediction.float() - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()  # the step's one host synchronisation, once the backward pass is queued
        if not math.isfinite(value):  # stop before the update, as if the step never ran
            result.diverged, result.stop_reason = True, f"non-finite loss at step {step}"
            log.warning("%s: %s; stopping early", desc, result.stop_reason)
            break
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, run.cosine)
        torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        opt.step()
        result.losses.append(value)
        if step == 0:
            result.first_step_time = time.perf_counter() - started
        _checkpoint(run, step)


def _checkpoint(run: _Run, step: int) -> None:
    """``on_step`` after update ``step``; a checkpoint's measurements must not move the run."""
    if run.on_step is not None:
        rng = torch.get_rng_state()
        run.on_step(step + 1)
        torch.set_rng_state(rng)
        run.model.train()


def _train_graphed(run: _Run, warmup: int = 3, chunk: int = 50) -> list[float]:
    """The eager loop's steps, the first ``warmup`` run eagerly on a side stream, the rest replayed
    from one captured CUDA graph (PyTorch's whole-network capture recipe). Batches are drawn on the
    CPU ``chunk`` steps at a time and copied once per chunk; losses are read back once per chunk."""
    model, params, steps, lr, cosine = run.model, run.params, run.steps, run.lr, run.cosine
    device = params[0].device
    sched = noise_scheduler(model)
    alphas = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    # a cosine schedule changes the learning rate per step: a tensor the captured graph reads
    lr_now = torch.tensor(lr, dtype=torch.float32, device=device) if cosine else lr
    opt = torch.optim.AdamW(params, lr=lr_now, weight_decay=run.weight_decay, capturable=True, foreach=True)
    batches = run.batches()
    pending = [batches.draw()]  # the first batch also gives the static buffers their shapes
    static = [v.to(device) for v in pending[0]]
    loss_now = torch.zeros((), device=device)
    autocast = _autocast(device, run.mixed_precision, cache_enabled=False)

    def step() -> None:
        x0, labels, noise, t = static
        a = alphas[t].view(-1, *[1] * (x0.dim() - 1))
        xt = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        with autocast:
            prediction = model(xt, t, labels)
        loss = (prediction.float() - noise).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        opt.step()
        loss_now.copy_(loss.detach())

    losses = torch.zeros(steps, device=device)
    graph = None
    side = torch.cuda.Stream(device)
    for begin in tqdm(range(0, steps, chunk), desc=run.desc, leave=False):
        count = min(chunk, steps - begin)
        drawn = pending + [batches.draw() for _ in range(count - len(pending))]
        pending = []
        stacked = [
            torch.stack([b[k] for b in drawn]).pin_memory().to(device, non_blocking=True) for k in range(4)
        ]
        for i in range(count):
            n = begin + i
            for buffer, column in zip(static, stacked):
                buffer.copy_(column[i])
            if isinstance(lr_now, torch.Tensor):
                lr_now.fill_(lr * _lr_factor(n, steps, cosine))
            if n < warmup:
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    opt.zero_grad(set_to_none=True)
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                if graph is None:
                    opt.zero_grad(set_to_none=True)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
                graph.replay()
            losses[n].copy_(loss_now)
        values = losses[: begin + count].tolist()  # one host synchronisation per chunk
        if not all(math.isfinite(v) for v in values):
            return values
    del graph
    for p in params:
        p.grad = None
    return losses.tolist()


def _autocast(device: torch.device, mixed_precision: str | None, cache_enabled: bool = True) -> Any:

    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device={name!r} but torch sees no GPU; use finetune.device=cpu")
    return torch.device(name)
