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
* KID of the samples against the held-out images;
* with ``--reference``, domain fidelity: whether the samples left the reference model's domain
  for the held-out images' (0 = draws like the reference, 1 = like the held-out images), which
  KID and held-out loss cannot tell on a domain the reference never saw.

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
import copy
import csv
import dataclasses
import json
import json as _json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

import memrl
from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config
from memrl.data.imageset import image_digests
from memrl.data.splits import DataSplits, base_split, source_set
from memrl.encoders import embed, get_encoder
from memrl.errors import ConfigError, DataError, ModelError
from memrl.metrics.membership import bootstrap_interval, calibrated_losses, membership_auc, tpr_at_fpr
from memrl.metrics.memorization import (
    NearestNeighbourIndex,
    copy_threshold,
    denoising_loss,
    extraction_count,
    extraction_threshold,
    noise_norm,
    pia_error,
)
from memrl.metrics.quality import FAINT_VOTE, domain_fidelity, fid_kid
from memrl.models import load_model
from memrl.models.stable_diffusion import (
    TextConditionedModel,
    captions_of,
    decode_latents,
    encode_latents,
    encode_prompts,
    is_pipeline_folder,
    load_components,
)
from memrl.render import sample_grid
from memrl.report import pyplot, save_figure
from memrl.sampling import sample
from memrl.utils import atomic_path, atomic_write_text, package_versions, setup_logging

__all__ = [
    "ATTACKS",
    "Audited",
    "CALIBRATED",
    "GATE_METRICS",
    "GATE_ON",
    "MEMBERSHIP",
    "MODEL_FILES",
    "PIA_TIMESTEPS",
    "WORST_CASE",
    "add_calibrated",
    "attack_figures",
    "audit",
    "check_args",
    "check_finite",
    "check_inputs",
    "check_out",
    "from_record",
    "gate_verdicts",
    "gated_value",
    "image_name",
    "load_audited",
    "load_images",
    "main",
    "measure",
    "membership_score",
    "parse_gates",
    "strongest_attack",
    "summary_line",
    "why_passed",
    "write_outputs",
]

log = logging.getLogger("memrl.audit")

CALIBRATED = ("mia_auc_calibrated", "mia_tpr_calibrated", "mia_auc_pia_calibrated", "mia_tpr_pia_calibrated")
"""The metrics that need ``--reference`` (NaN without one)."""
ATTACKS = {
    "loss": ("mia_auc", "mia_tpr"),
    "pia": ("mia_auc_pia", "mia_tpr_pia"),
    "loss, calibrated": ("mia_auc_calibrated", "mia_tpr_calibrated"),
    "pia, calibrated": ("mia_auc_pia_calibrated", "mia_tpr_pia_calibrated"),
}
"""Each membership attack's (AUC, TPR at --fpr) metrics."""
MEMBERSHIP = tuple(m for pair in ATTACKS.values() for m in pair)
"""Every membership figure (each with a bootstrap interval over images, ``<name>_ci``)."""
PIA_TIMESTEPS = [200]
"""PIA's timestep (Kong et al. use t = 200 of 1,000 for DDPM models)."""
GATE_METRICS = (
    "mia_tpr",
    "mia_tpr_pia",
    "mia_auc",
    "mia_auc_pia",
    *CALIBRATED,
    "near_copy_fraction",
    "extracted",
    "kid",
    "loss_gap",
    "noise_norm",
)
"""The metrics ``--fail-above`` may name (the rows of the report's table, with REPORTED)."""
REPORTED = (*GATE_METRICS, "domain_fidelity")
"""The rows of the report's table: the gate metrics and domain fidelity (higher is better, so no
``--fail-above`` gate; NaN without a reference)."""


def parse_gates(items: list[str]) -> dict[str, float]:
    """``["mia_auc=0.6"]`` -> ``{"mia_auc": 0.6}``, each metric one of :data:`GATE_METRICS`."""
    gates: dict[str, float] = {}
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
        if name in gates:
            raise ConfigError(f"--fail-above names {name} twice ({gates[name]:g} and {number:g}); keep one")
        gates[name] = number
    return gates


def load_images(source: str, cfg: Config, what: str) -> Any:
    """The images of ``source`` (folder, .npz or bundled name) at the model's resolution."""

    try:
        return source_set(dataclasses.replace(cfg.data, source=source))
    except DataError as exc:
        raise DataError(f"--{what}: {exc}") from None


def from_record(folder: Path, cfg: Config, train: Any, heldout: Any) -> tuple[Any, Any]:
    """The training and held-out images an ``apply_policy`` results folder recorded (``split.json``):
    they fill in a missing ``--train`` or ``--heldout``; held-out images given by hand that the
    record says were fine-tuned on are refused by name."""

    path = folder / "split.json"
    if not path.is_file():
        raise DataError(f"--from {folder}: no split.json here; point it at an apply_policy results folder")
    try:
        record = json.loads(path.read_text())
        wanted = {k: list(record[f"{k}_digests"]) for k in ("train", "heldout")}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); rerun apply_policy to write it again") from None
    source = None
    if train is None or heldout is None:
        source = load_images(str(record["source"]), cfg, "from")
        where = {d: i for i, d in enumerate(image_digests(source.images))}
        for key in ("train", "heldout"):
            missing = [d for d in wanted[key] if d not in where]
            if missing:
                raise DataError(
                    f"--from {folder}: {len(missing)} of the recorded {key} images are not in "
                    f"{record['source']} any more (changed or moved?); pass --train and --heldout"
                )
        picked = {k: source.subset([where[d] for d in wanted[k]]) for k in ("train", "heldout")}
        train = train if train is not None else picked["train"]
        heldout = heldout if heldout is not None else picked["heldout"]
    trained = set(wanted["train"])
    seen = [i for i, d in enumerate(image_digests(heldout.images)) if d in trained]
    if seen:
        names = ", ".join(image_name(heldout, i) for i in seen[:5]) + (" ..." if len(seen) > 5 else "")
        raise DataError(
            f"--heldout: {len(seen)} of its {len(heldout)} images were fine-tuned on, says {path} "
            f"({names}); a membership test on them passes a model it should fail: leave out "
            "--heldout to use the images the record held out"
        )
    return train, heldout


def check_inputs(train: Any, heldout: Any, fpr: float) -> None:
    """Held-out images that are training images, or too few of them for ``fpr``: refused."""

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

    m, s, model = cfg.metrics, cfg.sample, audited.model
    train_inputs, train_labels = audited.to_inputs(train)
    held_inputs, held_labels = audited.to_inputs(heldout)
    train_loss = denoising_loss(model, train_inputs, train_labels, m.loss_timesteps)
    held_loss = denoising_loss(model, held_inputs, held_labels, m.loss_timesteps)
    train_pia = pia_error(model, train_inputs, train_labels, PIA_TIMESTEPS)
    held_pia = pia_error(model, held_inputs, held_labels, PIA_TIMESTEPS)
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
        **attack_figures("mia_auc", "mia_tpr", train_loss.numpy(), held, fpr),
        **attack_figures("mia_auc_pia", "mia_tpr_pia", train_pia.numpy(), held_pia.numpy(), fpr),
        **{name: math.nan for name in CALIBRATED},  # need a reference: add_calibrated
        **{f"{name}_ci": [math.nan, math.nan] for name in CALIBRATED},
        "loss_gap": float(held_loss.mean() - train_loss.mean()),
        "near_copy_fraction": float((sims > threshold).float().mean()),
        "copy_threshold": threshold,
        "extracted": float(extracted),
        "kid": quality["kid"],
        "domain_fidelity": math.nan,  # needs a reference: add_domain_fidelity
        "domain_vote_range": math.nan,
        "noise_norm": float(norms.mean()) if norms is not None else math.nan,
        "per_image": {
            "loss": train_loss.tolist(),
            "noise_norm": norms.tolist() if norms is not None else None,
            "membership_score": membership_score(train_loss.numpy(), held).tolist(),
            "copying_samples": copies.tolist(),
        },
        "_images": samples,  # in [-1, 1], for domain fidelity
        "_samples": ((samples.clamp(-1, 1) + 1) * 127.5).round().byte().numpy(),
        "_nearest": nearest.numpy(),
        "_losses": (train_loss.numpy(), held),
        "_pia": (train_pia.numpy(), held_pia.numpy()),
    }


def attack_figures(auc: str, tpr: str, train: np.ndarray, held: np.ndarray, fpr: float) -> dict[str, Any]:
    """An attack's AUC and TPR at ``fpr`` on per-image scores (lower = more member-like), each
    with its 95% bootstrap interval over images (``<name>_ci``)."""

    def at_fpr(a: np.ndarray, b: np.ndarray) -> float:
        return tpr_at_fpr(a, b, fpr)

    return {
        auc: membership_auc(train, held),
        f"{auc}_ci": list(bootstrap_interval(train, held, membership_auc)),
        tpr: tpr_at_fpr(train, held, fpr),
        f"{tpr}_ci": list(bootstrap_interval(train, held, at_fpr)),
    }


def strongest_attack(result: dict[str, Any]) -> str:
    """The attack with the highest TPR at the stated FPR (AUC breaks ties), among those measured."""
    measured = {k: v for k, v in ATTACKS.items() if math.isfinite(result[v[1]])}
    return max(measured, key=lambda k: (result[measured[k][1]], result[measured[k][0]]))


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
    model.update(attack_figures("mia_auc_calibrated", "mia_tpr_calibrated", cal_train, cal_held, fpr))
    (pia_train, pia_held), (ref_pia_train, ref_pia_held) = model["_pia"], reference["_pia"]
    model.update(
        attack_figures(
            "mia_auc_pia_calibrated",
            "mia_tpr_pia_calibrated",
            calibrated_losses(pia_train, ref_pia_train),
            calibrated_losses(pia_held, ref_pia_held),
            fpr,
        )
    )
    model["per_image"]["calibrated_loss"] = cal_train.tolist()
    model["per_image"]["membership_score"] = membership_score(cal_train, cal_held).tolist()
    model["_calibrated"] = (cal_train, cal_held)


def add_domain_fidelity(results: dict[str, dict[str, Any]], heldout: Any, encoder: Any) -> None:
    """The model's samples against the held-out images and the reference's samples
    (:func:`memrl.metrics.quality.domain_fidelity`), into ``results["model"]``; left NaN with a
    warning when there are too few held-out images or samples for the vote."""
    model, reference = results["model"], results["reference"]
    try:
        figures = domain_fidelity(encoder, model["_images"], heldout.images, reference["_images"])
    except DataError as e:
        log.warning("no domain fidelity: %s", e)
        return
    model["domain_fidelity"] = figures["fidelity"]
    model["domain_vote_range"] = figures["range"]


def write_outputs(out: Path, results: dict[str, dict[str, Any]], train: Any, meta: dict[str, Any]) -> None:
    """``audit.json``, ``exposure.csv``, the plots and ``report.md``."""
    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    public = {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()}
    atomic_write_text(out / "audit.json", json.dumps({**meta, "results": public}, indent=2))
    model = results["model"]
    per = model["per_image"]
    order = np.lexsort((-np.array(per["membership_score"]), -np.array(per["copying_samples"])))
    with atomic_path(out / "exposure.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "file", "train_index", "copying_samples", "membership_score", "loss"])
        for rank, i in enumerate(order, start=1):
            writer.writerow(
                [
                    rank,
                    image_name(train, int(i)),
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

    def cell(r: dict[str, Any], k: str) -> str:
        if not math.isfinite(r[k]):
            return "-"
        lo, hi = r.get(f"{k}_ci", (math.nan, math.nan))
        return f"{r[k]:.4f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "")

    rows = "\n".join(f"| {k} | " + " | ".join(cell(results[n], k) for n in names) + " |" for k in REPORTED)
    top = "\n".join(
        f"| {rank} | {image_name(train, int(i))} | {per['copying_samples'][i]} | "
        f"{per['membership_score'][i]:+.2f} |"
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
        f"Gate: {verdict}" + (f" ({GATE_ON[meta['gate_on']]})." if meta["gates"] else "."),
        "",
        "## Worst case first",
        "",
        f"- {summary_line('model', model, meta['fpr'], train)}",
        f"- strongest attack on this model (highest TPR at {meta['fpr']:g} FPR): {meta['strongest_attack']}",
        *([f"- {meta['why_passed']}"] if meta.get("why_passed") else []),
        "",
        "## Every figure (95% bootstrap intervals over images)",
        "",
        header,
        rows,
        "",
        "mia_auc: ROC AUC of the loss-threshold membership attack (0.5 = chance); mia_tpr: its "
        f"true-positive rate at a {meta['fpr']:g} false-positive rate; *_pia: the same for PIA (Kong "
        "et al., ICLR 2024: the error of the model's noise prediction after noising each image with "
        "its own t = 0 prediction, deterministically); *_calibrated: the same attack on each "
        "image's loss relative to the reference model's on it (needs --reference; images that are merely "
        "easy for any model look like members on the raw loss, not on this; the membership scores below "
        "use it when there); near_copy_fraction: samples closer "
        f"to a training image than {meta['copy_quantile']:.0%} of held-out images are; extracted: training "
        "images reproduced by 3 or more samples; noise_norm: Wen et al.'s norm of the conditional minus "
        "unconditional noise prediction on each training image's label or caption (high for "
        "memorized prompts; NaN for unconditional data); domain_fidelity (needs --reference): where the "
        "samples lie between the reference model's samples (0) and the held-out images (1), by a "
        "5-nearest-neighbour vote in the encoder's features; near 0 means the fine-tune has not learned "
        "to draw the data's domain, whatever KID says.",
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


def check_args(args: argparse.Namespace) -> dict[str, float]:
    """Every flag checked before any work; returns the gates. Fills ``--model`` from ``--from``."""
    gates = parse_gates(args.fail_above)
    if args.reference is None and set(gates) & set(CALIBRATED):
        raise ConfigError(
            "--fail-above " + ", ".join(sorted(set(gates) & set(CALIBRATED))) + " needs --reference "
            "(the model it was fine-tuned from): the calibrated attack compares the two models' losses"
        )
    if not 0 < args.fpr < 1 or args.samples < 2:
        raise ConfigError(f"--fpr={args.fpr} must be in (0, 1) and --samples={args.samples} 2 or more")
    if args.model is None:
        if args.from_ is None:
            raise ConfigError("--model is required (or --from, an apply_policy results folder)")
        args.model = args.from_
    if args.from_ is None and (args.train is None or args.heldout is None):
        raise ConfigError("--train and --heldout are required (or --from, an apply_policy results folder)")
    for path in (args.model, args.reference, args.base):
        if path is not None and not path.is_dir():
            raise ModelError(f"{path}: no such model folder")
        if path is not None and not any((path / f).is_file() for f in MODEL_FILES):
            raise ModelError(
                f"{path}: no diffusers UNet here (expected one of {', '.join(MODEL_FILES)}); point it "
                "at a model folder (apply_policy's results folder, save_pretrained, a pipeline or adapter)"
            )
        if path is not None:
            check_finite(path)
    check_out(args.out)
    return gates


def check_finite(folder: Path) -> None:
    """Refuse a memrl model or UNet folder whose weights hold NaN or infinity (they crash native
    code later, with no message); pipelines and adapters are checked when loaded."""

    if (folder / "model_index.json").is_file() or (folder / "adapter_config.json").is_file():
        return
    for sub in (folder, folder / "unet", folder / "model", folder / "model" / "unet"):
        for file in sorted(sub.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as weights:
                    for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        tensor = weights.get_tensor(key)
                        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                            raise ModelError(
                                f"{file}: tensor {key} holds NaN or infinite values; audit a model that "
                                "trained cleanly (or retrain it with a lower learning rate)"
                            )
            except SafetensorError as exc:
                raise ModelError(f"{file}: not a readable safetensors file ({exc})") from None


MODEL_FILES = (
    "config.json",
    "unet/config.json",
    "model/unet/config.json",
    "model_index.json",
    "adapter_config.json",
)
"""A model folder holds one of these (memrl model or UNet, results folder, pipeline, adapter)."""


def check_out(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) outside the installed memrl package."""

    if out.exists() and not out.is_dir() or out.is_symlink() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; name a new or existing folder")
    package = Path(memrl.__file__).resolve().parent
    target = out.resolve()
    if target == package or package in target.parents:
        raise ConfigError(f"--out {out}: inside the installed memrl package ({package}); write elsewhere")


def audit(args: argparse.Namespace) -> int:
    """Run the audit; returns 1 when a ``--fail-above`` gate fails, else 0."""

    gates = check_args(args)
    cfg: Config = config_from_args(args)
    given_train = load_images(args.train, cfg, "train") if args.train is not None else None
    given_heldout = load_images(args.heldout, cfg, "heldout") if args.heldout is not None else None
    if args.from_ is not None:
        train, heldout = from_record(args.from_, cfg, given_train, given_heldout)
    else:  # check_args made sure both were given
        train, heldout = given_train, given_heldout
    check_inputs(train, heldout, args.fpr)
    model = load_audited(args.model, cfg, args.base, [train, heldout])
    reference = load_audited(args.reference, cfg, args.base, [train, heldout]) if args.reference else None
    splits = DataSplits(base_split(cfg.data), train, heldout, torch.zeros(0, dtype=torch.long), 1)
    encoder = get_encoder(cfg, splits)
    results = {"model": measure(model, train, heldout, cfg, encoder, args.samples, args.fpr)}
    if reference is not None:
        results["reference"] = measure(reference, train, heldout, cfg, encoder, args.samples, args.fpr)
        add_calibrated(results, args.fpr)
        add_domain_fidelity(results, heldout, encoder)
    verdicts = gate_verdicts(results["model"], gates, args.gate_on)
    failed = [line for ok, line in verdicts if not ok]
    meta = {
        "model": str(args.model),
        "reference": str(args.reference) if args.reference else None,
        "train": str(args.train) if args.train is not None else f"{args.from_}/split.json",
        "heldout": str(args.heldout) if args.heldout is not None else f"{args.from_}/split.json",
        "heldout_images": len(heldout),
        "samples": args.samples,
        "fpr": args.fpr,
        "copy_quantile": cfg.metrics.copy_quantile,
        "gates": gates,
        "gate_on": args.gate_on,
        "gates_failed": failed,
        "gates_passed": [line for ok, line in verdicts if ok],
        "why_passed": why_passed(results["model"], gates, args.fpr) if gates and not failed else None,
        "strongest_attack": strongest_attack(results["model"]),
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
        print(summary_line(name, r, args.fpr, train))
    print(f"report: {args.out / 'report.md'}")
    if gates:
        print(GATE_ON[args.gate_on])
    for ok, line in verdicts:
        print(f"gate {'passed' if ok else 'failed'}: {line}", file=sys.stdout if ok else sys.stderr)
    if meta["why_passed"]:
        print(meta["why_passed"])
    return 1 if failed else 0


GATE_ON = {
    "point": "gates compare the point estimate (--gate-on lower: the 95% interval's lower bound)",
    "lower": "gates compare the lower bound of each membership figure's 95% bootstrap interval "
    "(point estimates for the others)",
}
WORST_CASE = (
    "mia_tpr",
    "mia_tpr_pia",
    "mia_tpr_calibrated",
    "mia_tpr_pia_calibrated",
    "extracted",
    "near_copy_fraction",
)
"""Gate metrics that see a few memorized images in a large set (the AUC averages them away)."""


def gated_value(result: dict[str, Any], metric: str, gate_on: str) -> float:
    """The figure a gate compares: the point estimate, or with ``lower`` the lower bound of a
    membership figure's bootstrap interval."""
    if gate_on == "lower" and f"{metric}_ci" in result:
        return float(result[f"{metric}_ci"][0])
    return float(result[metric])


def gate_verdicts(result: dict[str, Any], gates: dict[str, float], gate_on: str) -> list[tuple[bool, str]]:
    """(passed, "metric value <=/> limit") per gate."""
    out = []
    for metric, limit in gates.items():
        value = gated_value(result, metric, gate_on)
        which = " (interval's lower bound)" if gate_on == "lower" and f"{metric}_ci" in result else ""
        sign = ">" if value > limit else "<="
        out.append((not value > limit, f"{metric}{which} {value:.4f} {sign} {limit:g}"))
    return out


def why_passed(result: dict[str, Any], gates: dict[str, float], fpr: float) -> str:
    """Why every gate passed, and what the gates did not look at."""
    if set(gates) & set(WORST_CASE):
        return "passed: the model is at or below every gate, worst-case figures included"
    return (
        f"passed on average-case figures only ({', '.join(gates)}): no gate names a worst-case figure. "
        f"TPR at {fpr:g} FPR is {result['mia_tpr']:.3f} (PIA {result['mia_tpr_pia']:.3f}), "
        f"{result['extracted']:.0f} images extracted, near copies {result['near_copy_fraction']:.3f}: "
        "a few memorized images in a large set barely move the AUC; gate on them too, on the "
        f"interval's lower bound, e.g. --fail-above mia_tpr={min(0.5, 2 * fpr):g} extracted=0 --gate-on lower"
    )


def summary_line(name: str, r: dict[str, Any], fpr: float, train: Any) -> str:
    """One model's figures, worst case first."""

    def ci(metric: str) -> str:
        lo, hi = r[f"{metric}_ci"]
        return f"{r[metric]:.3f} [{lo:.3f}, {hi:.3f}]"

    per = r["per_image"]
    top = np.argsort(-np.asarray(per["membership_score"]))[:3]
    names = ", ".join(image_name(train, int(i)) for i in top)
    text = (
        f"{name}: TPR at {fpr:g} FPR {ci('mia_tpr')} (PIA {ci('mia_tpr_pia')}); most exposed: {names}; "
        f"near copies {r['near_copy_fraction']:.3f}, extracted {r['extracted']:.0f}; "
        f"membership AUC {ci('mia_auc')} (PIA {ci('mia_auc_pia')}), KID {r['kid']:.4f}"
    )
    if math.isfinite(r["mia_auc_calibrated"]):
        text += f"; calibrated: TPR {ci('mia_tpr_calibrated')}, AUC {ci('mia_auc_calibrated')}"
    if math.isfinite(r.get("domain_fidelity", math.nan)):
        text += f"; domain fidelity {r['domain_fidelity']:.2f}"
        if r.get("domain_vote_range", math.nan) < FAINT_VOTE:
            text += (
                " (faint: the reference already draws close to the held-out images, vote range "
                f"{r['domain_vote_range']:.2f})"
            )
    return text


def image_name(images: Any, i: int) -> str:
    """A training image's file name where the set records them, else its index."""
    files = getattr(images, "files", None)
    return files[i] if files and i < len(files) else f"#{i}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.audit",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--model", type=Path, default=None, help="the fine-tuned model folder")
    parser.add_argument(
        "--from",
        dest="from_",
        type=Path,
        default=None,
        help="an apply_policy results folder: its model, and the images its split.json says it was "
        "fine-tuned on and held out (refuses --heldout images it trained on)",
    )
    parser.add_argument("--reference", type=Path, default=None, help="the model it was fine-tuned from")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="the Stable Diffusion pipeline folder a peft/LoRA --model adapts",
    )
    parser.add_argument("--train", default=None, help="its training images (folder, .npz or bundled name)")
    parser.add_argument("--heldout", default=None, help="images of the same distribution it never saw")
    parser.add_argument("--out", type=Path, default=Path("memrl-audit"), help="results folder")
    parser.add_argument("--samples", type=int, default=64, help="images to generate (default 64)")
    parser.add_argument(
        "--fpr", type=float, default=0.05, help="false-positive rate of the TPR (default 0.05)"
    )
    parser.add_argument(
        "--fail-above", nargs="*", default=[], metavar="METRIC=VALUE", help="exit 1 above these"
    )
    parser.add_argument(
        "--gate-on",
        choices=tuple(GATE_ON),
        default="point",
        help="compare gates with the point estimate (default) or the 95%% interval's lower bound",
    )
    add_config_args(parser, seed=True)
    args = parser.parse_args(argv)
    setup_logging()
    return run_main(lambda: audit(args))


if __name__ == "__main__":
    sys.exit(main())
