"""The base model every evaluation fine-tunes: shipped, cached, or pretrained once.

* ``model.path`` set: any local diffusers UNet folder (:func:`memrl.models.unet.load_model`).
* The embedded default: memrl ships its pretrained tiny UNets, so every machine fine-tunes
  bit-identical weights and finds the same stored evaluations: base model v2
  (``memrl/assets/base_model_v2``, the default config's: pretrained on a share of every training
  source, ``data.base: mix``) and v1 (``memrl/assets/base_model``, 2,000 MNIST digits: the shipped
  150-step table's, ``configs/bench.yaml``).
* Any other config: memrl pretrains its tiny UNet once on the base split and caches it under
  ``$MEMRL_CACHE/models/<key>``; the key covers the model settings (the pretraining seed included),
  the resolution, channels and the base split's fingerprint.

``python -m memrl.models.base`` regenerates the shipped v2 model from ``configs/default.yaml``
(``--config bench --out memrl/assets/base_model``: v1).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from memrl.config import Config, load_config
from memrl.data import DataSplits, load_splits
from memrl.models.unet import META_FILE, DiffusionModel, build_unet, load_model
from memrl.training import resolve_device, train_denoiser
from memrl.utils import (
    atomic_write_text,
    cache_dir,
    package_versions,
    setup_logging,
    stable_hash,
    without_none,
)

__all__ = [
    "PROVENANCE_FILE",
    "SHIPPED",
    "base_model_key",
    "get_base_model",
    "main",
    "pretrain_base_model",
    "shipped_fingerprint",
    "shipped_folder",
    "write_shipped",
]

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"


def base_model_key(cfg: Config, splits: DataSplits) -> str:
    """Cache key of the tiny base model: its settings (seed included; None-valued ones left out, so
    a setting added later with a None default keeps the key) and the base split."""
    parts = {
        "model": without_none(cfg.model.__dict__),
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "base": splits.base.fingerprint,
        "version": 2,
    }
    return stable_hash(parts)


SHIPPED = ("base_model_v2", "base_model")
"""The shipped base models' folders in ``memrl/assets``: v2 (the default) and v1."""


def shipped_folder(name: str = SHIPPED[0]) -> Path:
    """Where a shipped base model lives inside the installed package (default: v2)."""
    return Path(str(resources.files("memrl") / "assets" / name))


def _shipped() -> dict[str, tuple[Path, dict]]:
    """Cache key -> (folder, provenance) of every shipped base model."""
    found = {}
    for name in SHIPPED:
        provenance = shipped_folder(name) / PROVENANCE_FILE
        if provenance.is_file():
            record = json.loads(provenance.read_text())
            found[record["key"]] = (shipped_folder(name), record)
    return found


def shipped_fingerprint(cfg: Config, splits: DataSplits) -> str | None:
    """The weight fingerprint of the shipped base model ``cfg`` uses, if any (read, not computed)."""
    hit = _shipped().get(base_model_key(cfg, splits))
    return hit[1].get("weights_fingerprint") if hit else None


_LOADED: dict[str, DiffusionModel] = {}


def get_base_model(cfg: Config, splits: DataSplits) -> DiffusionModel:
    """The base model: ``model.path`` if set, the shipped model if it matches, else memrl's tiny
    UNet pretrained once and cached. Shared within a process: callers fine-tune a ``.copy()``."""
    if cfg.model.path is not None:
        key = f"path:{Path(cfg.model.path).resolve()}"
        if key not in _LOADED:
            _LOADED[key] = load_model(cfg.model.path, cfg.model.num_classes)
        return _LOADED[key]
    key = base_model_key(cfg, splits)
    if key in _LOADED:
        return _LOADED[key]
    folder = cache_dir() / "models" / key
    shipped = _shipped().get(key)
    if shipped is not None:
        model = load_model(shipped[0])
    elif (folder / META_FILE).is_file():
        model = load_model(folder)
    else:
        model, _ = pretrain_base_model(cfg, splits)
        model.save(folder)
        log.info("cached base model at %s", folder)
    _LOADED[key] = model
    return model


def pretrain_base_model(cfg: Config, splits: DataSplits) -> tuple[DiffusionModel, float]:
    """Pretrain the tiny base UNet on the base split with classifier-free label dropout.

    Returns the model (on the CPU) and the seconds it took.
    """

    m = cfg.model
    with torch.random.fork_rng():
        torch.manual_seed(m.seed)
        model = DiffusionModel(build_unet(cfg), m.num_classes)
    model.to(resolve_device(cfg.finetune.device))
    log.info("pretraining the base UNet: %d steps on %d images", m.pretrain_steps, len(splits.base))
    result = train_denoiser(
        model,
        splits.base,
        steps=m.pretrain_steps,
        batch_size=m.pretrain_batch_size,
        lr=m.pretrain_lr,
        cond_dropout=m.cond_dropout,
        seed=m.seed,
        grad_clip=1.0,
        cosine=True,
        desc="pretrain base UNet",
    )
    if result.diverged or not model.is_finite():
        raise RuntimeError(f"base-model pretraining diverged: {result.stop_reason or 'non-finite weights'}")
    model.cpu().eval()
    return model, result.wall_time


def write_shipped(
    model: DiffusionModel, cfg: Config, splits: DataSplits, seconds: float, folder: Path
) -> None:
    """Save ``model`` as the shipped base model with its provenance."""
    model.save(folder)
    provenance = {
        "key": base_model_key(cfg, splits),
        "weights_fingerprint": model.fingerprint(),
        "base_split_fingerprint": splits.base.fingerprint,
        "config": {"model": cfg.model.__dict__, "data": cfg.data.__dict__},
        "pretrain_steps": cfg.model.pretrain_steps,
        "seconds": round(seconds, 1),
        "versions": package_versions(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(folder / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Regenerate a shipped base model: v2 from the default config (memrl/assets/base_model_v2),
    or v1 with ``--config bench --out memrl/assets/base_model``."""

    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m memrl.models.base", description=main.__doc__)
    parser.add_argument("--config", default="default", help="the config whose base model to build")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets" / SHIPPED[0])
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    splits = load_splits(cfg.data)
    model, seconds = pretrain_base_model(cfg, splits)
    write_shipped(model, cfg, splits, seconds, args.out)
    print(f"wrote {args.out} (weights {model.fingerprint()}, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
