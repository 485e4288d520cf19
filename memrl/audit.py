"""Audit a fine-tuned diffusion model: how much does it memorize its training images?

    python -m memrl.audit --model delivered/model --train my_images/ --heldout more_images/ --out audit/
    python -m memrl.audit --model m/ --reference base/ --train t.npz --heldout h.npz --fail-above mia_auc=0.6

For the model (and, with ``--reference``, the model it was fine-tuned from, side by side):

* loss-based membership inference (Carlini et al. 2023): each image's denoising loss at fixed
  noise and timesteps; ROC AUC of "lower loss = member" for the training images against the
  held-out ones, and the true-positive rate at ``--fpr``; with ``--reference``, also calibrated:
  the same attack on each image's loss relative to the reference's on it (Watson et al., ICLR
  2022), which images that are merely easy do not fool;
* near copies: ``--samples`` images generated (conditioned on the training labels when there are
  any), each one's nearest training image in the embedding of an encoder trained on the audited
  images; a sample closer than ``metrics.copy_quantile`` of held-out images are is a near copy;
* extraction: training images matched (tiled pixel distance) by a clique of 3 or more samples;
* Wen et al.'s noise norm on each training image's label or caption (conditioned models);
* KID of the samples against the held-out images.

Writes ``audit.json`` (every figure, settings, versions, fingerprints), ``exposure.csv`` (training
images ranked by exposure: membership score and how many samples copy them) and ``report.md``
with plots. ``--fail-above METRIC=VALUE`` exits 1 when the model exceeds it: a release gate.
Held-out images must come from the training images' distribution and never have been trained on.
Models: a memrl model folder (``apply_policy``'s ``model/``), a diffusers UNet folder built for
memrl's label conditioning, a Stable Diffusion pipeline folder (images are encoded to VAE latents,
each conditioned on its caption: ``captions.csv`` or ``data.caption_template``; run with
``--config stable_diffusion``), or a peft/LoRA adapter folder applied to the pipeline ``--base``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config
from memrl.errors import ConfigError, DataError, ModelError
from memrl.metrics.membership import calibrated_losses, membership_auc, tpr_at_fpr
from memrl.utils import atomic_path, atomic_write_text, package_versions, setup_logging

log = logging.getLogger("memrl.audit")

CALIBRATED = ("mia_auc_calibrated", "mia_tpr_calibrated")
"""The metrics that need ``--reference`` (NaN without one)."""
GATE_METRICS = (
    "mia_auc",
    "mia_tpr",
    *CALIBRATED,
    "near_copy_fraction",
    "extracted",
    "kid",
    "loss_gap",
    "noise_norm",
)
"""The metrics ``--fail-above`` may name (the rows of the report's table)."""


def parse_gates(items: list[str]) -> dict[str, float]:
    """``["mia_auc=0.6"]`` -> ``{"mia_auc": 0.6}``, each metric one of :data:`GATE_METRICS`."""
    gates = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if name not in GATE_METRICS or not math.isfinite(number):
            raise ConfigError(
                f"--fail-above {item!r}: write METRIC=NUMBER with METRIC one of {', '.join(GATE_METRICS)}"
            )
        gates[name] = number
    return gates


def load_images(source: str, cfg: Config, what: str) -> Any:
    """The images of ``source`` (folder, .npz or bundled name) at the model's resolution."""
    from memrl.data.splits import source_set

    try:
        return source_set(dataclasses.replace(cfg.data, source=source))
    except DataError as exc:
        raise DataError(f"--{what}: {exc}") from None


def check_inputs(train: Any, heldout: Any, fpr: float) -> None:
    """Held-out images that are training images, or too few of them for ``fpr``: refused."""
    import torch

    d = torch.cdist(heldout.images.flatten(1).float(), train.images.flatten(1).float())
    shared = int((d.min(dim=1).values == 0).sum())
    if shared:
        raise DataError(
            f"--heldout shares {shared} of its {len(heldout)} images with --train (identical pixels); "
            "held-out images must be ones the model never saw: remove them"
        )
    need = math.ceil(1 / fpr)
    if len(heldout) < need or len(train) < 2:
        raise DataError(
            f"--heldout has {len(heldout)} images and --train {len(train)}: a false-positive rate of "
            f"{fpr:g} needs at least {need} held-out images (and 2 training images); add images or "
            f"raise --fpr to {1 / max(len(heldout), 1):.3g} or more"
        )


@dataclass
class Audited:
    """A model to audit and how its inputs and outputs relate to images: a label-conditioned memrl
    model works on the images themselves; a Stable Diffusion UNet on VAE latents, conditioned on
    each image's caption (a row of its prompt table), its samples decoded through the VAE."""

    model: Any
    to_inputs: Callable[[Any], tuple[Any, Any]]
    """ImageSet -> (model inputs, labels or prompt indices)."""
    to_images: Callable[[Any], Any]
    """Model samples -> images in [-1, 1]."""


def _label_model(model: Any) -> Audited:
    return Audited(model, lambda s: (s.images, s.labels), lambda x: x)


def _pipeline_model(components: Any, unet: Any, cfg: Config, images: list[Any]) -> Audited:
    import json as _json

    import torch

    from memrl.models.stable_diffusion import (
        TextConditionedModel,
        captions_of,
        decode_latents,
        encode_latents,
        encode_prompts,
    )

    template = cfg.data.caption_template
    prompts = [*dict.fromkeys(c for part in images for c in captions_of(part, template) if c), ""]
    index = {p: i for i, p in enumerate(prompts)}
    model = TextConditionedModel(unet, encode_prompts(components, prompts), components.path)
    config = components.path / "scheduler" / "scheduler_config.json"
    model.scheduler_config = _json.loads(config.read_text()) if config.is_file() else None

    def to_inputs(part: Any) -> tuple[Any, Any]:
        ids = [index.get(c, len(prompts) - 1) for c in captions_of(part, template)]
        return encode_latents(components, part.images), torch.tensor(ids)

    return Audited(model, to_inputs, lambda x: decode_latents(components, x))


def load_audited(path: Path, cfg: Config, base: Path | None, images: list[Any]) -> Audited:
    """The model at ``path``: a Stable Diffusion pipeline folder, a peft (LoRA) adapter folder
    applied to the pipeline ``base``, or a memrl model / diffusers UNet folder whose resolution
    and channels match ``cfg.data``. ``images``: the audited sets (their captions make the prompt
    table of a pipeline)."""
    import copy

    from memrl.models import load_model
    from memrl.models.stable_diffusion import is_pipeline_folder, load_components

    if (path / "model").is_dir() and (path / "result.json").is_file():
        path = path / "model"  # an apply_policy results folder: its delivered model
    if is_pipeline_folder(path):
        components = load_components(str(path.resolve()))
        return _pipeline_model(components, copy.deepcopy(components.unet), cfg, images)
    if (path / "adapter_config.json").is_file():
        if base is None or not is_pipeline_folder(base):
            raise ModelError(
                f"{path}: a peft adapter; name the Stable Diffusion pipeline folder it was trained on "
                "with --base"
            )
        from peft import PeftModel

        components = load_components(str(base.resolve()))
        try:
            unet = PeftModel.from_pretrained(copy.deepcopy(components.unet), str(path)).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: cannot apply this adapter to {base} ({first[:150]})") from None
        return _pipeline_model(components, unet, cfg, images)
    model = load_model(path, cfg.model.num_classes)
    if model.resolution != cfg.data.resolution or model.channels != cfg.data.channels:
        raise ModelError(
            f"{path}: a {model.channels}-channel {model.resolution} px model, but the config gives "
            f"{cfg.data.channels} channels at {cfg.data.resolution} px; pass --set "
            f"data.resolution={model.resolution} data.channels={model.channels} (or the config it was "
            "trained with)"
        )
    return _label_model(model)


def measure(
    audited: Audited, train: Any, heldout: Any, cfg: Config, encoder: Any, n_samples: int, fpr: float
) -> dict[str, Any]:
    """Every figure of one model, with per-image scores (see the module docstring)."""
    import torch

    from memrl.encoders import embed
    from memrl.metrics.memorization import (
        NearestNeighbourIndex,
        copy_threshold,
        denoising_loss,
        extraction_count,
        extraction_threshold,
        noise_norm,
    )
    from memrl.metrics.quality import fid_kid
    from memrl.sampling import sample

    m, s, model = cfg.metrics, cfg.sample, audited.model
    train_inputs, train_labels = audited.to_inputs(train)
    held_inputs, held_labels = audited.to_inputs(heldout)
    train_loss = denoising_loss(model, train_inputs, train_labels, m.loss_timesteps)
    held_loss = denoising_loss(model, held_inputs, held_labels, m.loss_timesteps)
    labels = (
        train_labels.repeat(n_samples // len(train) + 1)[:n_samples]
        if train_labels is not None
        else torch.full((n_samples,), -1)
    )
    samples = audited.to_images(sample(model, labels, steps=s.steps, guidance=s.guidance, seed=cfg.seed))
    index = NearestNeighbourIndex(embed(encoder, train.images), m.index, m.faiss_index)
    threshold = copy_threshold(index, embed(encoder, heldout.images), m.copy_quantile)
    sims, nearest = index.search(embed(encoder, samples), 1)
    sims, nearest = sims[:, 0], nearest[:, 0]
    cutoff = (
        m.extraction_threshold
        if m.extraction_quantile is None
        else extraction_threshold(train.images, heldout.images, m.extraction_quantile)
    )
    extracted, _ = extraction_count(samples, train.images, cutoff)
    quality = fid_kid(encoder, samples, heldout.images, min(m.kid_subset_size, len(samples), len(heldout)))
    conditioned = train_labels is not None and bool((train_labels >= 0).any())
    norms = noise_norm(model, train_labels, m.noise_norm_timesteps) if conditioned else None
    held = held_loss.numpy()
    copies = torch.bincount(nearest[sims > threshold], minlength=len(train)).numpy()
    return {
        "mia_auc": membership_auc(train_loss, held_loss),
        "mia_tpr": tpr_at_fpr(train_loss, held_loss, fpr),
        "mia_auc_calibrated": math.nan,  # needs a reference: add_calibrated
        "mia_tpr_calibrated": math.nan,
        "loss_gap": float(held_loss.mean() - train_loss.mean()),
        "near_copy_fraction": float((sims > threshold).float().mean()),
        "copy_threshold": threshold,
        "extracted": float(extracted),
        "kid": quality["kid"],
        "noise_norm": float(norms.mean()) if norms is not None else math.nan,
        "per_image": {
            "loss": train_loss.tolist(),
            "noise_norm": norms.tolist() if norms is not None else None,
            "membership_score": membership_score(train_loss.numpy(), held).tolist(),
            "copying_samples": copies.tolist(),
        },
        "_samples": ((samples.clamp(-1, 1) + 1) * 127.5).round().byte().numpy(),
        "_nearest": nearest.numpy(),
        "_losses": (train_loss.numpy(), held),
    }


def membership_score(train: np.ndarray, held: np.ndarray) -> np.ndarray:
    """How far below the held-out images' median each training image's loss is, in held-out
    standard deviations (the exposure ranking's membership score)."""
    return (float(np.median(held)) - train) / max(float(held.std()), 1e-12)


def add_calibrated(results: dict[str, dict[str, Any]], fpr: float) -> None:
    """The model's membership attack on each image's loss relative to the reference model's
    (:func:`memrl.metrics.membership.calibrated_losses`), into ``results["model"]``; its per-image
    membership score (the exposure ranking) becomes the calibrated one too."""
    model, reference = results["model"], results["reference"]
    (train, held), (ref_train, ref_held) = model["_losses"], reference["_losses"]
    cal_train, cal_held = calibrated_losses(train, ref_train), calibrated_losses(held, ref_held)
    model["mia_auc_calibrated"] = membership_auc(cal_train, cal_held)
    model["mia_tpr_calibrated"] = tpr_at_fpr(cal_train, cal_held, fpr)
    model["per_image"]["calibrated_loss"] = cal_train.tolist()
    model["per_image"]["membership_score"] = membership_score(cal_train, cal_held).tolist()
    model["_calibrated"] = (cal_train, cal_held)


def write_outputs(out: Path, results: dict[str, dict[str, Any]], train: Any, meta: dict[str, Any]) -> None:
    """``audit.json``, ``exposure.csv``, the plots and ``report.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.render import sample_grid
    from memrl.report import save_figure

    out.mkdir(parents=True, exist_ok=True)
    public = {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()}
    atomic_write_text(out / "audit.json", json.dumps({**meta, "results": public}, indent=2))
    model = results["model"]
    per = model["per_image"]
    order = np.lexsort((-np.array(per["membership_score"]), -np.array(per["copying_samples"])))
    with atomic_path(out / "exposure.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "train_index", "copying_samples", "membership_score", "loss"])
        for rank, i in enumerate(order, start=1):
            writer.writerow(
                [
                    rank,
                    int(i),
                    per["copying_samples"][i],
                    f"{per['membership_score'][i]:.4f}",
                    f"{per['loss'][i]:.6f}",
                ]
            )
    panels = [
        (f"{name}: membership AUC {r['mia_auc']:.3f}", "denoising loss", r["_losses"])
        for name, r in results.items()
    ]
    if "_calibrated" in model:
        title = f"model, calibrated: AUC {model['mia_auc_calibrated']:.3f}"
        panels.append((title, "log(loss / reference's loss)", model["_calibrated"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, xlabel, (train_loss, held)) in zip(axes[0], panels):
        bins = np.linspace(min(train_loss.min(), held.min()), max(train_loss.max(), held.max()), 30)
        ax.hist(held, bins, alpha=0.6, label="held-out", density=True)
        ax.hist(train_loss, bins, alpha=0.6, label="training", density=True)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{xlabel} (lower: more member-like)")
        ax.legend(fontsize=7)
    save_figure(fig, out / "membership.png")
    plt.close(fig)
    copiers = np.argsort(-np.isin(model["_nearest"], order[:16]).astype(int), kind="stable")
    grid = sample_grid(model["_samples"][copiers], model["_nearest"][copiers], train)
    fig, ax = plt.subplots(figsize=(3, 0.4 * min(16, len(copiers)) + 1))
    ax.imshow(grid)
    ax.axis("off")
    ax.set_title("samples (left) and their nearest training image", fontsize=8)
    save_figure(fig, out / "copies.png")
    plt.close(fig)
    names = list(results)
    rows = "\n".join(
        f"| {k} | "
        + " | ".join(f"{results[n][k]:.4f}" if math.isfinite(results[n][k]) else "-" for n in names)
        + " |"
        for k in GATE_METRICS
    )
    top = "\n".join(
        f"| {rank} | {int(i)} | {per['copying_samples'][i]} | {per['membership_score'][i]:+.2f} |"
        for rank, i in enumerate(order[:10], start=1)
    )
    gates = meta.get("gates_failed") or []
    verdict = (
        "**FAILED**: " + "; ".join(gates)
        if gates
        else ("passed every gate" if meta["gates"] else "no gate set")
    )
    header = "| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    text = [
        f"# memrl audit: {meta['model']}",
        "",
        f"{len(train)} training images, {meta['heldout_images']} held out, {meta['samples']} samples. "
        f"Gate: {verdict}.",
        "",
        header,
        rows,
        "",
        "mia_auc: ROC AUC of the loss-threshold membership attack (0.5 = chance); mia_tpr: its "
        f"true-positive rate at a {meta['fpr']:g} false-positive rate; *_calibrated: the same attack on each "
        "image's loss relative to the reference model's on it (needs --reference; images that are merely "
        "easy for any model look like members on the raw loss, not on this; the membership scores below "
        "use it when there); near_copy_fraction: samples closer "
        f"to a training image than {meta['copy_quantile']:.0%} of held-out images are; extracted: training "
        "images reproduced by 3 or more samples; noise_norm: Wen et al.'s norm of the conditional minus "
        "unconditional noise prediction on each training image's label or caption (high for "
        "memorized prompts; NaN for unconditional data).",
        "",
        "![membership](membership.png)",
        "",
        "## Most exposed training images",
        "",
        "| rank | training image | copying samples | membership score (held-out std) |",
        "|---|---|---|---|",
        top,
        "",
        "![copies](copies.png)",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(text))


def audit(args: argparse.Namespace) -> int:
    """Run the audit; returns 1 when a ``--fail-above`` gate fails, else 0."""
    import torch

    from memrl.data.splits import DataSplits, base_split
    from memrl.encoders import get_encoder

    gates = parse_gates(args.fail_above)
    if args.reference is None and set(gates) & set(CALIBRATED):
        raise ConfigError(
            "--fail-above " + ", ".join(sorted(set(gates) & set(CALIBRATED))) + " needs --reference "
            "(the model it was fine-tuned from): the calibrated attack compares the two models' losses"
        )
    if not 0 < args.fpr < 1 or args.samples < 2:
        raise ConfigError(f"--fpr={args.fpr} must be in (0, 1) and --samples={args.samples} 2 or more")
    cfg: Config = config_from_args(args)
    for path in (args.model, args.reference, args.base):
        if path is not None and not path.is_dir():
            raise ModelError(f"{path}: no such model folder")
    train = load_images(args.train, cfg, "train")
    heldout = load_images(args.heldout, cfg, "heldout")
    check_inputs(train, heldout, args.fpr)
    model = load_audited(args.model, cfg, args.base, [train, heldout])
    reference = load_audited(args.reference, cfg, args.base, [train, heldout]) if args.reference else None
    splits = DataSplits(base_split(cfg.data), train, heldout, torch.zeros(0, dtype=torch.long), 1)
    encoder = get_encoder(cfg, splits)
    results = {"model": measure(model, train, heldout, cfg, encoder, args.samples, args.fpr)}
    if reference is not None:
        results["reference"] = measure(reference, train, heldout, cfg, encoder, args.samples, args.fpr)
        add_calibrated(results, args.fpr)
    failed = [f"{k} {results['model'][k]:.4f} > {v:g}" for k, v in gates.items() if results["model"][k] > v]
    meta = {
        "model": str(args.model),
        "reference": str(args.reference) if args.reference else None,
        "train": str(args.train),
        "heldout": str(args.heldout),
        "heldout_images": len(heldout),
        "samples": args.samples,
        "fpr": args.fpr,
        "copy_quantile": cfg.metrics.copy_quantile,
        "gates": gates,
        "gates_failed": failed,
        "fingerprints": {
            "train": train.fingerprint,
            "heldout": heldout.fingerprint,
            "model": model.model.fingerprint(),
        },
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "versions": package_versions(),
    }
    write_outputs(args.out, results, train, meta)
    for name, r in results.items():
        print(
            f"{name}: membership AUC {r['mia_auc']:.3f}, TPR at {args.fpr:g} FPR {r['mia_tpr']:.3f}, "
            f"near copies {r['near_copy_fraction']:.3f}, extracted {r['extracted']:.0f}, KID {r['kid']:.4f}"
            + (
                f", calibrated membership AUC {r['mia_auc_calibrated']:.3f}"
                if math.isfinite(r["mia_auc_calibrated"])
                else ""
            )
        )
    print(f"report: {args.out / 'report.md'}")
    for line in failed:
        print(f"gate failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.audit",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--model", type=Path, required=True, help="the fine-tuned model folder")
    parser.add_argument("--reference", type=Path, default=None, help="the model it was fine-tuned from")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="the Stable Diffusion pipeline folder a peft/LoRA --model adapts",
    )
    parser.add_argument("--train", required=True, help="its training images (folder, .npz or bundled name)")
    parser.add_argument("--heldout", required=True, help="images of the same distribution it never saw")
    parser.add_argument("--out", type=Path, default=Path("memrl-audit"), help="results folder")
    parser.add_argument("--samples", type=int, default=64, help="images to generate (default 64)")
    parser.add_argument(
        "--fpr", type=float, default=0.05, help="false-positive rate of the TPR (default 0.05)"
    )
    parser.add_argument(
        "--fail-above", nargs="*", default=[], metavar="METRIC=VALUE", help="exit 1 above these"
    )
    add_config_args(parser, seed=True)
    args = parser.parse_args(argv)
    setup_logging()
    return run_main(lambda: audit(args))


if __name__ == "__main__":
    sys.exit(main())
