"""The label-conditioned diffusers UNet memrl fine-tunes, its construction, saving and loading.

A :class:`DiffusionModel` is a ``UNet2DConditionModel`` plus a label embedding that feeds its
cross-attention (index ``num_classes`` is the null label used for classifier-free guidance).
``load_model(path)`` reads a saved DiffusionModel or any local diffusers UNet folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memrl.config import Config
from memrl.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDING_FILE = "label_embedding.safetensors"
META_FILE = "memrl_model.json"


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def install_groupnorm_guard(model: nn.Module) -> None:
    """Make every GroupNorm input contiguous.

    torch 2.13 (CPU) segfaults in GroupNorm backward when the input is a non-contiguous tensor
    that does not require grad while the norm's affine parameters do, which is what freezing the
    modules upstream of a trainable norm produces. The hook costs nothing measurable.
    """
    for module in model.modules():
        if isinstance(module, nn.GroupNorm) and not getattr(module, "_memrl_guard", False):
            module.register_forward_pre_hook(_contiguous_input)
            module._memrl_guard = True  # type: ignore[assignment]


class DiffusionModel(nn.Module):
    """A diffusers ``UNet2DConditionModel`` conditioned on integer labels through cross-attention."""

    scheduler_config: dict[str, Any] | None = None
    """A pipeline's noise-scheduler config (None: diffusers' default 1000-step schedule)."""
    switchable: set[str] | None = None
    """A switchable fine-tune's parameter names (:func:`memrl.finetune.set_trainable`), else None."""

    def __init__(self, unet: Any, num_classes: int) -> None:
        super().__init__()
        self.unet: Any = unet
        self.num_classes = num_classes
        dim = unet.config.cross_attention_dim
        self.label_embedding = nn.Embedding(num_classes + 1, dim)
        install_groupnorm_guard(self.unet)

    def freeze_conditioning(self) -> None:
        """Keep the conditioning fixed while fine-tuning (the label embedding is not searched)."""
        self.label_embedding.requires_grad_(False)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    def labels_or_null(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        """Labels the embedding knows; unknown or missing labels become the null label."""
        if labels is None:
            return torch.full((n,), self.null_label, dtype=torch.long)
        labels = labels.to(torch.long)
        return torch.where((labels >= 0) & (labels < self.num_classes), labels, self.null_label)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` at timesteps ``t`` given labels (null label = unconditional)."""
        cond = self.label_embedding(labels.to(x.device))[:, None, :]
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def fingerprint(self) -> str:
        """sha256 over every parameter and buffer (name, shape, bytes)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def copy(self) -> DiffusionModel:
        """A deep copy to fine-tune; the original stays untouched."""
        clone = copy.deepcopy(self)
        clone.train()
        return clone

    def is_finite(self) -> bool:
        """True when no parameter or buffer holds NaN or infinity."""
        return all(bool(torch.isfinite(t).all()) for t in self.state_dict().values() if t.is_floating_point())

    def save(self, folder: str | Path) -> None:
        """Save atomically: ``unet/`` via save_pretrained (safetensors) + the label embedding.

        A model with non-finite weights is refused (it must never reach a cache).
        """

        if not self.is_finite():
            raise ModelError(f"{folder}: refusing to save a model with NaN or infinite weights")
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        save_file({"weight": self.label_embedding.weight.detach().contiguous()}, tmp / EMBEDDING_FILE)
        (tmp / META_FILE).write_text(json.dumps({"num_classes": self.num_classes}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)


def build_unet(cfg: Config) -> Any:
    """memrl's tiny label-conditioned UNet (random weights), sized by ``cfg.model``."""
    from diffusers import UNet2DConditionModel

    m = cfg.model
    levels = len(m.block_out_channels)
    if levels < 2:
        raise ModelError("model.block_out_channels needs at least two levels")
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=cfg.data.resolution,
        in_channels=cfg.data.channels,
        out_channels=cfg.data.channels,
        block_out_channels=tuple(m.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=m.layers_per_block,
        cross_attention_dim=m.cross_attention_dim,
        attention_head_dim=m.attention_head_dim,
        norm_num_groups=m.norm_num_groups,
    )


def load_model(path: str | Path, num_classes: int = 10) -> DiffusionModel:
    """Load a saved DiffusionModel, a diffusers UNet folder, or a pipeline folder's ``unet/``.

    A plain UNet folder gets a seeded random label embedding (it is part of the fingerprint).
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    candidates = [path / "unet", path]
    unet_dir = next((c for c in candidates if (c / "config.json").is_file()), None)
    if unet_dir is None:
        raise ModelError(
            f"{path}: no diffusers UNet here (expected config.json in {path} or {path / 'unet'}); "
            "point model.path at a folder written by save_pretrained"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{unet_dir}: cannot load this UNet ({exc})") from None
    meta_file = path / META_FILE
    if meta_file.is_file():
        try:
            num_classes = int(json.loads(meta_file.read_text())["num_classes"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{meta_file}: unreadable ({exc}); delete the folder to rebuild it") from None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DiffusionModel(unet, num_classes)
    if (path / EMBEDDING_FILE).is_file():
        model.label_embedding.weight.data.copy_(load_file(path / EMBEDDING_FILE)["weight"])
    model.eval()
    return model


__all__ = ["DiffusionModel", "ModelError", "build_unet", "install_groupnorm_guard", "load_model"]
