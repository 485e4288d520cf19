"""The base model: a label-conditioned diffusers UNet, its pretraining cache and local loading.

A :class:`DiffusionModel` is a ``UNet2DConditionModel`` plus a label embedding that feeds its
cross-attention (index ``num_classes`` is the null label used for classifier-free guidance).
``get_base_model(cfg)`` pretrains memrl's tiny base UNet once on the base split and caches it
under ``$MEMRL_CACHE/models/<hash>``; ``load_model(path)`` reads any local diffusers UNet folder.
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
from torch import nn

from memrl.config import Config, stable_hash
from memrl.data import DataSplits
from memrl.utils import cache_dir

log = logging.getLogger(__name__)

_EMBEDDING_FILE = "label_embedding.safetensors"
_META_FILE = "memrl_model.json"


class ModelError(ValueError):
    """A model folder cannot be used; the message names it and the fix."""


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

    def __init__(self, unet: Any, num_classes: int) -> None:
        super().__init__()
        self.unet: Any = unet
        self.num_classes = num_classes
        dim = unet.config.cross_attention_dim
        self.label_embedding = nn.Embedding(num_classes + 1, dim)
        install_groupnorm_guard(self.unet)

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

    def save(self, folder: str | Path) -> None:
        """Save atomically: ``unet/`` via save_pretrained (safetensors) + the label embedding."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        save_file({"weight": self.label_embedding.weight.detach().contiguous()}, tmp / _EMBEDDING_FILE)
        (tmp / _META_FILE).write_text(json.dumps({"num_classes": self.num_classes}))
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
    from safetensors.torch import load_file

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
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{unet_dir}: cannot load this UNet ({exc})") from None
    meta_file = path / _META_FILE
    if meta_file.is_file():
        num_classes = int(json.loads(meta_file.read_text())["num_classes"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DiffusionModel(unet, num_classes)
    if (path / _EMBEDDING_FILE).is_file():
        model.label_embedding.weight.data.copy_(load_file(path / _EMBEDDING_FILE)["weight"])
    model.eval()
    return model


def base_model_key(cfg: Config, splits: DataSplits) -> str:
    """Cache key of the tiny base model: its config and the base split's fingerprint."""
    parts = {
        "model": cfg.model.__dict__,
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "base": splits.base.fingerprint,
        "version": 1,
    }
    return stable_hash(parts)


_LOADED: dict[str, DiffusionModel] = {}


def get_base_model(cfg: Config, splits: DataSplits) -> DiffusionModel:
    """The base model: ``model.path`` if set, else memrl's tiny UNet, pretrained once and cached.

    Loaded models are shared within a process; callers fine-tune a ``.copy()``.
    """
    if cfg.model.path is not None:
        key = f"path:{Path(cfg.model.path).resolve()}"
        if key not in _LOADED:
            _LOADED[key] = load_model(cfg.model.path, cfg.model.num_classes)
        return _LOADED[key]
    key = base_model_key(cfg, splits)
    if key in _LOADED:
        return _LOADED[key]
    folder = cache_dir() / "models" / key
    if (folder / _META_FILE).is_file():
        model = load_model(folder)
    else:
        model = pretrain_base_model(cfg, splits)
        model.save(folder)
        log.info("cached base model at %s", folder)
    _LOADED[key] = model
    return model


def pretrain_base_model(cfg: Config, splits: DataSplits) -> DiffusionModel:
    """Pretrain the tiny base UNet on the base split with classifier-free label dropout."""
    from memrl.finetune import resolve_device, train_denoiser

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = DiffusionModel(build_unet(cfg), cfg.model.num_classes)
    model.to(resolve_device(cfg.finetune.device))
    m = cfg.model
    log.info("pretraining the base UNet: %d steps on %d images", m.pretrain_steps, len(splits.base))
    result = train_denoiser(
        model,
        splits.base,
        steps=m.pretrain_steps,
        batch_size=m.pretrain_batch_size,
        lr=m.pretrain_lr,
        cond_dropout=m.cond_dropout,
        seed=cfg.seed,
        grad_clip=1.0,
        cosine=True,
        desc="pretrain base UNet",
    )
    if result.diverged:
        raise RuntimeError(f"base-model pretraining diverged: {result.stop_reason}")
    model.cpu().eval()
    return model


__all__ = [
    "DiffusionModel",
    "ModelError",
    "base_model_key",
    "build_unet",
    "get_base_model",
    "install_groupnorm_guard",
    "load_model",
    "pretrain_base_model",
]
