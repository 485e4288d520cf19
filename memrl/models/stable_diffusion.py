"""Stable Diffusion from a local pipeline folder (nothing downloads): MemControl's own setting.

A folder written by ``StableDiffusionPipeline.save_pretrained`` holds ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``. memrl fine-tunes the UNet on VAE latents,
conditioned on the embeddings of each image's caption (``captions.csv``, or a template such as
"a photo of a {class}"): a :class:`TextConditionedModel` is the UNet plus a fixed table of prompt
embeddings, so label ``i`` means prompt ``i`` and the null label means the empty prompt used for
classifier-free guidance. Latents and prompt embeddings are computed once and cached (keyed by the
data and the VAE / text-encoder fingerprints); samples are decoded through the VAE and scored as
images. The merged result is saved as a whole pipeline folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memrl.errors import ModelError
from memrl.models.unet import DiffusionModel, install_groupnorm_guard
from memrl.utils import atomic_path, cache_dir, stable_hash

__all__ = [
    "Components",
    "DEFAULT_TEMPLATE",
    "PARTS",
    "TextConditionedModel",
    "build_random_pipeline",
    "captions_of",
    "decode_latents",
    "encode_latents",
    "encode_prompts",
    "is_pipeline_folder",
    "load_components",
]

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_TEMPLATE = "a photo of a {}"


def is_pipeline_folder(path: str | Path | None) -> bool:
    """True for a diffusers pipeline folder (``model_index.json`` beside its parts)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


def _state_fingerprint(*modules: nn.Module) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Components:
    """The parts of a pipeline folder memrl uses, loaded once per folder."""

    path: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @functools.cached_property
    def fingerprint(self) -> str:
        """Over the UNet, VAE and text encoder weights."""
        return _state_fingerprint(self.unet, self.vae, self.text_encoder)

    @functools.cached_property
    def vae_fingerprint(self) -> str:
        return _state_fingerprint(self.vae)


@functools.lru_cache(maxsize=2)
def load_components(path: str) -> Components:
    """Load and check a pipeline folder: every part present, and the parts fit each other."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path)
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise ModelError(
            f"{folder}: a Stable Diffusion pipeline folder needs {', '.join(PARTS)}; {', '.join(missing)} "
            "missing. Write it with StableDiffusionPipeline.save_pretrained, or copy the missing folders"
        )
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder / "unet"),
        "vae": lambda: AutoencoderKL.from_pretrained(folder / "vae"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"),
    }
    parts: dict[str, Any] = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{folder / name}: cannot load this {name} ({str(exc)[:200]})") from None
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(
            f"{folder}: the UNet takes {unet.config.in_channels} channels but the VAE makes "
            f"{vae.config.latent_channels}-channel latents; the parts are from different models"
        )
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelError(
            f"{folder}: the UNet attends to {unet.config.cross_attention_dim}-d text embeddings but the text "
            f"encoder makes {text_encoder.config.hidden_size}-d ones; the parts are from different models"
        )
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    return Components(folder, unet, vae, text_encoder, parts["tokenizer"])


class TextConditionedModel(DiffusionModel):
    """A pipeline's UNet conditioned on a fixed table of prompt embeddings (the last row is the
    empty prompt, the null label for classifier-free guidance)."""

    prompts: torch.Tensor

    def __init__(self, unet: Any, prompts: torch.Tensor, source: Path) -> None:
        nn.Module.__init__(self)
        self.unet = unet
        self.num_classes = len(prompts) - 1
        self.register_buffer("prompts", prompts.detach().clone())
        self.source = source
        install_groupnorm_guard(self.unet)

    def freeze_conditioning(self) -> None:
        """The prompt table is a buffer: nothing to freeze."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.prompts[labels.to(self.prompts.device)].to(x.dtype)
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def save(self, folder: str | Path) -> None:
        """Save the whole pipeline folder with this UNet (loads with StableDiffusionPipeline)."""
        from diffusers import StableDiffusionPipeline

        if not self.is_finite():
            raise ModelError(f"{folder}: refusing to save a model with NaN or infinite weights")
        pipe: Any = StableDiffusionPipeline.from_pretrained(
            self.source, unet=self.unet, safety_checker=None, requires_safety_checker=False
        )
        pipe.save_pretrained(folder, safe_serialization=True)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), L, D) text-encoder hidden states, cached by prompts and encoder weights."""
    key = stable_hash([prompts, components.fingerprint, "prompts"])
    path = cache_dir() / "sd" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["prompts"]
    tok = components.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(components.text_encoder.parameters()).device
    out = components.text_encoder(ids.input_ids.to(device))[0].float().cpu()
    _save_tensor(path, "prompts", out)
    return out


@torch.no_grad()
def encode_latents(components: Components, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """VAE latents (scaled by the VAE's scaling factor) of images in [-1, 1], cached by content."""
    digest = hashlib.sha256(images.float().contiguous().numpy().tobytes()).hexdigest()[:16]
    key = stable_hash([digest, components.vae_fingerprint, "latents"])
    path = cache_dir() / "sd" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["latents"]
    vae = components.vae
    device = next(vae.parameters()).device
    scale = vae.config.scaling_factor
    latents = torch.cat(
        [
            (vae.encode(chunk.to(device)).latent_dist.mean * scale).cpu()
            for chunk in images.float().split(batch_size)
        ]
    )
    _save_tensor(path, "latents", latents)
    return latents


@torch.no_grad()
def decode_latents(components: Components, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents."""
    vae = components.vae
    device = next(vae.parameters()).device
    scale = vae.config.scaling_factor
    out = [
        vae.decode(chunk.to(device).float() / scale).sample.clamp(-1, 1).cpu()
        for chunk in latents.split(batch_size)
    ]
    return torch.cat(out)


def _save_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:

    with atomic_path(path) as tmp:
        save_file({name: tensor.contiguous()}, tmp)


def captions_of(images: Any, template: str | None) -> list[str]:
    """Each image's caption: its own (``captions.csv``), else the template filled with its class
    name (folder name, or the label for the bundled digits), else the template without a class."""
    template = template or DEFAULT_TEMPLATE
    names = images.meta.get("classes") or []
    out = []
    for i in range(len(images)):
        own = images.captions[i] if images.captions is not None else ""
        if own:
            out.append(own)
        elif images.labels is not None:
            label = int(images.labels[i])
            out.append(template.format(names[label] if label < len(names) else label))
        else:
            out.append(template.format("").replace("  ", " ").strip())
    return out


def build_random_pipeline(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-initialised Stable Diffusion pipeline folder, built offline from configs:
    ``tiny`` (16 px images, 8x8 latents: every code path in seconds on a CPU, as diffusers' own tests
    do) or ``sd15`` (Stable Diffusion 1.5's exact architecture: 860 M-parameter UNet, full VAE and
    text encoder, 512 px), with a byte-level CLIP tokenizer (no merges)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tiny = size == "tiny"
    length = 16 if tiny else 77
    width = 16 if tiny else 768
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8 if tiny else 64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1 if tiny else 2,
        block_out_channels=(8, 16) if tiny else (320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")
        if tiny
        else ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
        if tiny
        else ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width,
        attention_head_dim=4 if tiny else 8,
        norm_num_groups=4 if tiny else 32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16) if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=4 if tiny else 32,
        sample_size=16 if tiny else 512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=32 if tiny else 3072,
            num_attention_heads=2 if tiny else 12,
            num_hidden_layers=2 if tiny else 12,
            vocab_size=len(vocab) if tiny else 49408,
            max_position_embeddings=length,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=length)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
