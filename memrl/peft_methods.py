"""What "unfreeze" means inside the selected module groups.

Every method takes the same data (module-name prefixes from :class:`memrl.search_space.SearchSpace`),
freezes the whole model, then makes trainable, inside the selected modules only:

* ``full``: every parameter.
* ``attention``: the attention layers' parameters (attn1/attn2: q, k, v, out projections).
* ``bias_norm``: biases and normalisation affine parameters (BitFit + norms).
* ``difffit``: a learnable per-channel scale on every linear/conv output, plus biases and norms
  (DiffFit, Xie et al. 2023).
* ``lora``: low-rank adapters on every linear/conv layer (peft ``LoraConfig`` whose
  ``target_modules`` is a regex built from the mask).
* ``svdiff``: learnable shifts of the singular values of every linear/conv weight (SVDiff,
  Han et al. 2023).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from memrl.registry import METHODS  # noqa: F401  (re-exported)

__all__ = ["SpectralShift", "apply_method", "merge_adapters", "under"]

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
_WEIGHTED = (nn.Linear, nn.Conv2d)


def under(name: str, prefixes: list[str]) -> bool:
    """Whether the module or parameter ``name`` sits at or below one of ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules_under(root: nn.Module, prefixes: list[str]) -> list[tuple[str, nn.Module]]:
    """Every (name, module) at or below one of ``prefixes``."""
    return [(name, module) for name, module in root.named_modules() if under(name, prefixes)]


def _attention_class() -> type:
    from diffusers.models.attention_processor import Attention

    return Attention


def _scale_output(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
    scale = module.difffit_scale
    shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (-1,)
    return output * scale.view(shape)


class SpectralShift(nn.Module):
    """Parametrization W = U diag(relu(S + delta)) V^T with frozen U, S, V and trainable delta."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        matrix = weight.detach().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self.shape = tuple(weight.shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.s + self.delta)
        return ((self.u * s) @ self.vh).reshape(self.shape)


def _lora(unet: nn.Module, modules: list[tuple[str, nn.Module]], rank: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in modules if isinstance(m, _WEIGHTED)]
    if not names:
        return
    regex = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=regex, init_lora_weights=True)
    inject_adapter_in_model(config, unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)


def _full(unet: nn.Module, modules: list[tuple[str, nn.Module]], rank: int) -> None:
    for _, module in modules:
        module.requires_grad_(True)


def _attention(unet: nn.Module, modules: list[tuple[str, nn.Module]], rank: int) -> None:
    attention = _attention_class()
    for _, module in modules:
        if isinstance(module, attention):
            module.requires_grad_(True)


def _bias_norm(unet: nn.Module, modules: list[tuple[str, nn.Module]], rank: int) -> None:
    for _, module in modules:
        if isinstance(module, _NORMS):
            module.requires_grad_(True)
        elif isinstance(module, _WEIGHTED) and module.bias is not None:
            module.bias.requires_grad_(True)


def _difffit(unet: nn.Module, modules: list[tuple[str, nn.Module]], rank: int) -> None:
    _bias_norm(unet, modules, rank)
    for _, module in modules:
        if isinstance(module, _WEIGHTED):
            out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.difffit_scale = nn.Parameter(torch.ones(out, device=module.weight.device))
            module.register_forward_hook(_scale_output)


def _svdiff(unet: nn.Module, modules: list[tuple[str, Any]], rank: int) -> None:
    for _, module in modules:
        if isinstance(module, _WEIGHTED):
            target: Any = module  # gains .parametrizations below
            parametrize.register_parametrization(target, "weight", SpectralShift(target.weight))
            target.parametrizations.weight.original.requires_grad_(False)


_APPLY = {
    "full": _full,
    "attention": _attention,
    "bias_norm": _bias_norm,
    "difffit": _difffit,
    "lora": _lora,
    "svdiff": _svdiff,
}


def apply_method(unet: nn.Module, prefixes: list[str], method: str, lora_rank: int = 4) -> list[nn.Parameter]:
    """Freeze ``unet``, then unfreeze ``method``'s parameters inside ``prefixes``.

    Modifies ``unet`` in place (adds adapters for lora/difffit/svdiff); apply it to a copy.
    Returns the trainable parameters.
    """
    if method not in _APPLY:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    unet.requires_grad_(False)
    _APPLY[method](unet, _modules_under(unet, prefixes), lora_rank)
    return [p for p in unet.parameters() if p.requires_grad]


def merge_adapters(unet: nn.Module) -> nn.Module:
    """Fold every method's extra parameters into plain weights, in place, so the UNet saves and
    loads as an ordinary diffusers model: LoRA is merged, SVDiff's shifted spectrum is written
    back, DiffFit's scales are folded into weights and biases."""
    for name, module in list(unet.named_modules()):
        if hasattr(module, "difffit_scale"):
            scale = module.difffit_scale.detach()
            shape = (-1,) + (1,) * (module.weight.ndim - 1)
            module.weight.data.mul_(scale.view(shape))
            if module.bias is not None:
                module.bias.data.mul_(scale)
            module._forward_hooks.clear()
            del module.difffit_scale
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if hasattr(module, "merge") and hasattr(module, "get_base_layer") and "." in name:
            module.merge()
            parent_name, child = name.rsplit(".", 1)
            setattr(unet.get_submodule(parent_name), child, module.get_base_layer())
    return unet
