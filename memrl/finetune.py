"""The inner loop of the search: a short, seeded fine-tune of a fresh copy of the base model with
only the mask's modules trainable (under the configured PEFT method)."""

from __future__ import annotations

from collections.abc import Callable

from memrl.config import Config
from memrl.data import ImageSet
from memrl.errors import ConfigError
from memrl.models import DiffusionModel
from memrl.peft_methods import apply_method, under
from memrl.training import FinetuneResult, resolve_device, train_denoiser

__all__ = ["finetune", "set_trainable"]


def finetune(
    base: DiffusionModel,
    data: ImageSet,
    prefixes: list[str],
    cfg: Config,
    on_step: Callable[[DiffusionModel, int], None] | None = None,
    may_train: list[str] | None = None,
) -> tuple[DiffusionModel, FinetuneResult]:
    """Fine-tune a fresh copy of ``base`` with only ``prefixes`` unfrozen under ``cfg.search.method``.

    ``on_step(model, n)`` runs after every update ``n`` (checkpoints). ``may_train``: prefixes that
    ``on_step`` may unfreeze later with :func:`set_trainable` (a run whose mask changes): the
    optimizer holds their parameters from the start, frozen until then; with the groups held
    fixed the run is the plain one. The base model is never modified. Returns the fine-tuned copy
    and its FinetuneResult.
    """
    f = cfg.finetune
    if f.cuda_graph and f.gradient_checkpointing:
        raise ConfigError(
            "finetune.cuda_graph and finetune.gradient_checkpointing cannot both be on; "
            "set finetune.gradient_checkpointing=false (graphs pay off on small models that fit anyway)"
        )
    model = base.copy().to(resolve_device(cfg.finetune.device))
    model.freeze_conditioning()
    total = sum(p.numel() for p in model.unet.parameters())
    held = None
    if may_train is None:
        apply_method(model.unet, prefixes, cfg.search.method, cfg.search.lora_rank)
    else:
        everything = list(dict.fromkeys([*prefixes, *may_train]))
        held = apply_method(model.unet, everything, cfg.search.method, cfg.search.lora_rank)
        model.switchable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
        set_trainable(model, prefixes)
    if cfg.finetune.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    result = train_denoiser(
        model,
        data,
        steps=f.steps,
        batch_size=f.batch_size,
        lr=f.lr,
        cond_dropout=cfg.model.cond_dropout,
        seed=f.seed,
        grad_clip=f.grad_clip,
        weight_decay=f.weight_decay,
        desc="fine-tune",
        mixed_precision=f.mixed_precision,
        cuda_graph=bool(f.cuda_graph),
        on_step=None if on_step is None else lambda n: on_step(model, n),
        params=held,
    )
    result.total_params = total
    return model, result


def set_trainable(model: DiffusionModel, prefixes: list[str]) -> None:
    """From the next update on, train only the parameters under ``prefixes`` among those a
    switchable run holds (:func:`finetune` with ``may_train``); the others stay as they are, their
    optimizer state kept, and get no update (not even weight decay) while frozen."""
    held = model.switchable
    if held is None:
        raise ValueError("set_trainable needs a run started with finetune(..., may_train=[...])")
    for name, p in model.unet.named_parameters():
        if name in held:
            p.requires_grad_(under(name, prefixes))
