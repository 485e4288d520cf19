"""Does the world show the phenomenon? Issue 50's acceptance, measured on every task of a suite.

For each task: the base model alone (does it copy anything before fine-tuning?), the quality
metric's controls (KID of other real images, of noise and of a constant image against the
held-out set), and one fine-tune of the mask of ones to ``--steps`` steps, scored at every
checkpoint with the same pipeline as every evaluation (``memrl.scoring.score_model``: losses,
samples, copies, extraction, KID/FID, and domain fidelity against the base model's samples:
``memrl.scoring.domain_fidelities``); with ``--mask full`` full fine-tuning of every parameter,
with ``--mask best`` each task's best mask of the curve tables, for the first task of each source.
A sample sheet per task (samples beside their nearest
training images) goes to ``docs/world/``; one JSON per task to ``--out`` (a rerun skips tasks
already there, so a stopped run resumes).

    OMP_NUM_THREADS=1 python bench/world.py run --shard 0/2 &   # two single-threaded workers
    OMP_NUM_THREADS=1 python bench/world.py run --shard 1/2 &
    python bench/world.py report                                 # docs/world.md from the JSONs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import load_config
from memrl.context import TaskContext, full_unet, suite
from memrl.data.bundled import SOURCES, suite_source
from memrl.metrics.quality import FAINT_VOTE
from memrl.utils import atomic_write_text, package_versions, setup_logging

log = logging.getLogger("world")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "world"
DOCS = ROOT / "docs" / "world"
CHECKPOINTS = (25, 50, 100, 150, 200, 300, 400)
COPY_BAR = 0.1
"""Acceptance: the canary copy fraction must exceed this at some checkpoint."""
KEEP = (
    "heldout_loss",
    "canary_loss",
    "canary_log_loss_ratio",
    "mia_auc_private",
    "mia_tpr_private",
    "canary_copy_fraction",
    "near_copy_fraction",
    "distinct_copied",
    "copy_threshold",
    "extracted",
    "extraction_threshold",
    "kid",
    "fid",
)


def _kept(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in KEEP if k in metrics}


def measure_task(
    name: str, cfg: Any, heldout: bool, steps: int, mask: str = "ones"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every figure of one task, and the samples for its sheet: ``mask`` is ``ones`` (every
    attention group), ``full`` (full fine-tuning of every UNet parameter, MemControl's baseline) or
    a mask of groups (``"0101100"``)."""
    import torch

    from memrl.finetune import finetune
    from memrl.metrics.quality import quality_controls
    from memrl.scoring import domain_fidelities, score_model
    from memrl.training import FinetuneResult

    cfg = load_config(cfg, {"finetune.steps": steps})
    ctx = TaskContext.get(full_unet(cfg) if mask == "full" else cfg)
    start = time.perf_counter()
    zeros = np.zeros(ctx.space.k, dtype=np.int64)
    ones = np.ones(ctx.space.k, dtype=np.int64)
    if mask not in ("ones", "full"):
        ones = np.array([int(c) for c in mask], dtype=np.int64)  # the mask fine-tuned
    base_eval = score_model(ctx.base, ctx, zeros, FinetuneResult())
    splits = ctx.splits
    controls = quality_controls(
        ctx.encoder, splits.heldout.images, splits.private.images, cfg.metrics.kid_subset_size
    )
    sheets = {"base": (base_eval.samples, base_eval.nearest)}
    curve: list[dict[str, Any]] = []
    wanted = {c for c in CHECKPOINTS if c <= steps} | {steps}

    def checkpoint(model: Any, n: int) -> None:
        if n not in wanted:
            return
        t0 = time.perf_counter()
        snapshot = FinetuneResult(trainable_params=1, total_params=1)
        result = score_model(model, ctx, ones, snapshot)
        fidelity = domain_fidelities(ctx, [result], base_eval)[0]
        curve.append(
            {
                "step": n,
                **_kept(result.metrics),
                "domain_fidelity": fidelity["fidelity"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        sheets[n] = (result.samples, result.nearest)
        log.info(
            "%s step %d: canary copies %.2f, near copies %.2f, extracted %d, KID %.4f",
            name,
            n,
            result.metrics["canary_copy_fraction"],
            result.metrics["near_copy_fraction"],
            result.metrics["extracted"],
            result.metrics["kid"],
        )

    ft_start = time.perf_counter()
    with torch.random.fork_rng():
        _, ft = finetune(ctx.base, ctx.model_splits.finetune_set(), ctx.space.prefixes(ones), cfg, checkpoint)
    source = cfg.data.source
    record = {
        "task": name,
        "source": source,
        "suite_source": suite_source(source),
        "kind": SOURCES[source].kind if source in SOURCES else "folder",
        "patches": SOURCES[source].distinct_images < 10 if source in SOURCES else False,
        "heldout": heldout,
        "private": len(splits.private),
        "canaries": len(splits.canary_index),
        "duplication": splits.duplication,
        "mask": "full" if mask == "full" else "".join(map(str, ones)),
        "base": _kept(base_eval.metrics),
        "controls": controls,
        "curve": sorted(curve, key=lambda r: r["step"]),
        "finetune_seconds": round(time.perf_counter() - ft_start, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "diverged": ft.diverged,
        "seed": cfg.finetune.seed,
        "config_hash": cfg.hash(),
        "fingerprints": ctx.fingerprints,
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return record, sheets


def write_sheet(name: str, record: dict[str, Any], sheets: dict[Any, Any], ctx: TaskContext) -> Path:
    """Base samples, the mask of ones at its peak canary copying and at the last step, each sample
    beside its nearest training image (canary-conditioned samples first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memrl.render import sample_grid

    curve = record["curve"]
    peak = max(curve, key=lambda r: (r["canary_copy_fraction"], -r["step"]))["step"]
    stages = ["base", *dict.fromkeys([peak, curve[-1]["step"]])]
    kind = "full" if record["mask"] == "full" else "ones" if set(record["mask"]) == {"1"} else "best"
    label = {"full": "full fine-tuning", "ones": "ones", "best": f"mask {record['mask']}"}[kind]
    fig, axes = plt.subplots(1, len(stages), figsize=(2.2 * len(stages), 6.5))
    for ax, stage in zip(np.atleast_1d(axes), stages):
        samples, nearest = sheets[stage]
        order = np.r_[np.arange(0, 6), np.arange(len(samples) - 6, len(samples))]
        ax.imshow(
            sample_grid(samples[order], nearest[order], ctx.splits.private, n=12), interpolation="nearest"
        )
        row = record["base"] if stage == "base" else next(r for r in curve if r["step"] == stage)
        title = "base" if stage == "base" else f"{label}, {stage} steps"
        ax.set_title(
            f"{title}\ncanary copies {row['canary_copy_fraction']:.2f}\nextracted {row['extracted']:.0f}",
            fontsize=8,
        )
        ax.axis("off")
    fig.suptitle(f"{name}: sample | nearest training image", fontsize=9)
    folder = DOCS if kind == "ones" else DOCS / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    entries = suite(cfg)
    index, count = (int(v) for v in args.shard.split("/"))
    results = RESULTS if args.mask == "ones" else RESULTS / args.mask
    results.mkdir(parents=True, exist_ok=True)
    masks = {e.name: "ones" for e in entries}
    if args.mask != "ones":  # full fine-tuning or the best mask: the first task of each source
        entries = first_of_each_source(entries)
        masks = {e.name: args.mask for e in entries}
    if args.mask == "best":  # each task's best (mask, steps) at memorization weight 0.5, from its curves
        masks = best_masks(cfg)
        entries = [e for e in entries if e.name in masks]
    for i, entry in enumerate(entries):
        if i % count != index or (args.tasks and entry.name not in args.tasks):
            continue
        path = results / f"{entry.name}.json"
        if path.is_file():
            log.info("%s: done already (%s)", entry.name, path)
            continue
        log.info("%s: measuring (%d/%d)", entry.name, i + 1, len(entries))
        task_cfg = entry.cfg
        if args.mask == "full":  # can it draw the domain? Canaries once: no collapse onto duplicates
            task_cfg = entry.cfg.with_changes({"data.duplication": 1})
        record, sheets = measure_task(entry.name, task_cfg, entry.heldout, args.steps, masks[entry.name])
        ctx = TaskContext.get(load_config(entry.cfg, {"finetune.steps": args.steps}))
        write_sheet(entry.name, record, sheets, ctx)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        log.info("%s: %.0f s", entry.name, record["seconds"])
    return 0


def first_of_each_source(entries: list[Any]) -> list[Any]:
    """The suite's first task of each source, in suite order."""
    firsts = {e.cfg.data.source: e for e in reversed(entries)}
    return [e for e in entries if firsts[e.cfg.data.source] is e]


VOTE = RESULTS / "vote" / "vote.json"
"""Not beside the task records: the report reads every ``*.json`` there as one."""
REDRAWS = 3
"""Further draws of the base model per source: domain fidelity's noise where nothing was learned."""


def vote(args: argparse.Namespace) -> int:
    """Per source (its first task): how well domain fidelity's vote tells the base model's samples
    from held-out images (floor, ceiling, range; the same base samples as ``run``'s), and the
    fidelity of :data:`REDRAWS` further draws of the base model, which should score 0. To
    ``bench/results/world/vote/vote.json``; the report reads it."""
    from memrl.metrics.quality import domain_fidelity
    from memrl.scoring import base_samples, from_uint8, score_model
    from memrl.training import FinetuneResult

    out = {}
    for entry in first_of_each_source(suite(load_config(args.config))):
        ctx = TaskContext.get(entry.cfg)
        base = score_model(ctx.base, ctx, np.zeros(ctx.space.k, dtype=np.int64), FinetuneResult())
        base_images, held = from_uint8(base), ctx.splits.heldout.images
        figures = domain_fidelity(ctx.encoder, base_images, held, base_images)
        seed = ctx.cfg.finetune.seed
        redraws = [
            domain_fidelity(ctx.encoder, base_samples(ctx, seed + i), held, base_images)["fidelity"]
            for i in range(1, REDRAWS + 1)
        ]
        out[entry.cfg.data.source] = {
            "task": entry.name,
            **{k: figures[k] for k in ("floor", "ceiling", "range")},
            "redraws": redraws,
            "heldout": len(held),
            "samples": len(base_images),
        }
        log.info("%s: vote range %.2f, redraws %s", entry.name, figures["range"], np.round(redraws, 2))
    record = {
        "sources": out,
        "config": args.config,
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    VOTE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(VOTE, json.dumps(record, indent=1) + "\n")
    return 0


def best_masks(cfg: Any) -> dict[str, str]:
    """Each task with complete curves: its best mask of groups at memorization weight 0.5 (any
    checkpoint, fine-tune seed 0)."""
    from memrl.curves import FULL, load_curves

    table = load_curves(cfg)
    out = {}
    for t in np.flatnonzero(table.complete()):
        r = table.rewards(cfg.reward, int(t), 0.5)[:, 0, :]
        r[table.masks.index(FULL)] = -np.inf
        out[table.names[t]] = table.masks[int(np.unravel_index(int(np.nanargmax(r)), r.shape)[0])]
    return out


def exposure(r: dict[str, Any], steps: int = 400, batch: int = 32) -> float:
    """How often each canary is drawn by ``steps`` steps (uniform draws from the fine-tune set)."""
    size = r["private"] + r["canaries"] * (r["duplication"] - 1)
    return steps * batch * r["duplication"] / size


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(args: argparse.Namespace) -> int:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    entries = suite(load_config(args.config))
    order = [e.name for e in entries]
    split = {e.name: e.heldout for e in entries}
    for r in records:  # the suite's split today (bench3 was re-split after some records were made)
        r["heldout"] = split.get(r["task"], r["heldout"])
    records.sort(key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    lines = [
        "| task | split | images | canaries x dup | canary draws by 400 steps "
        "| base: near copies / extracted | peak canary copies (step) | near copies there "
        "| extracted there | KID base / 400 "
        "| KID real / noise / constant | held-out loss base / best (step) | copies > 0.1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    passed = 0
    for r in records:
        curve = r["curve"]
        peak = max(curve, key=lambda c: (c["canary_copy_fraction"], -c["step"]))
        ok = peak["canary_copy_fraction"] > COPY_BAR
        low = min(curve, key=lambda c: c["heldout_loss"])
        passed += ok
        c = r["controls"]
        kind = f"{r['kind']}{' (patches)' if r['patches'] else ''}"
        lines.append(
            f"| [{r['task']}](world/{r['task']}.png) | {'held out' if r['heldout'] else 'training'} "
            f"| {kind}, "
            f"{r['private']} | {r['canaries']} x {r['duplication']} | {exposure(r):,.0f} | "
            f"{_fmt(r['base']['near_copy_fraction'])} / {r['base']['extracted']:.0f} | "
            f"{_fmt(peak['canary_copy_fraction'])} ({peak['step']}) | {_fmt(peak['near_copy_fraction'])} | "
            f"{peak['extracted']:.0f} | {_fmt(r['base']['kid'], 4)} / {_fmt(curve[-1]['kid'], 4)} | "
            f"{_fmt(c['real'], 4)} / {_fmt(c['noise'], 4)} / {_fmt(c['constant'], 4)} "
            f"| {_fmt(r['base']['heldout_loss'], 4)} / {_fmt(low['heldout_loss'], 4)} ({low['step']}) "
            f"| {'yes' if ok else 'no'} |"
        )
    kinds = {
        "full": "Full fine-tuning (every UNet parameter, 400 steps) on the private images of the first task "
        "of each source, canaries not duplicated (whether the base model adapts to draw the domain; "
        "with the task's duplication, small sets collapse onto their canaries, a memorization effect "
        "the table above already shows)",
        "best": "The best mask of the curve tables (memorization weight 0.5, the first task of each source)",
    }
    votes = json.loads(VOTE.read_text())["sources"] if VOTE.is_file() else {}

    def vote_cell(source: str) -> str:
        v = votes.get(source)
        if v is None:
            return "-"
        faint = " faint" if v["range"] < FAINT_VOTE else ""
        return f"{v['range']:.2f}{faint} ({min(v['redraws']):+.2f} to {max(v['redraws']):+.2f})"

    others: dict[str, list[dict[str, Any]]] = {}
    for kind, title in kinds.items():
        found = [json.loads(p.read_text()) for p in sorted((RESULTS / kind).glob("*.json"))]
        found.sort(key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
        others[kind] = found
        if not found:
            continue
        lines += [
            "",
            f"{title}: [sheets](world/{kind}/).",
            "",
            "| source | task | mask | KID base / best (step) / 400 | KID noise / constant "
            "| resembles the domain | domain fidelity 25 / 100 / 400 | vote range (base redraws) "
            "| peak canary copies (step) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in found:
            best = min(r["curve"], key=lambda c: c["kid"])
            top = max(r["curve"], key=lambda c: (c["canary_copy_fraction"], -c["step"]))
            c = r["controls"]
            lines.append(
                f"| {r['source']} | [{r['task']}](world/{kind}/{r['task']}.png) | {r['mask']} | "
                f"{_fmt(r['base']['kid'], 4)} / "
                f"{_fmt(best['kid'], 4)} ({best['step']}) / {_fmt(r['curve'][-1]['kid'], 4)} | "
                f"{_fmt(c['noise'], 4)} / {_fmt(c['constant'], 4)} | {'yes' if resembles(r) else 'no'} | "
                f"{fidelity_cells(r)} | {vote_cell(r['source'])} | "
                f"{_fmt(top['canary_copy_fraction'])} ({top['step']}) |"
            )
    fulls = others["full"]
    measured = [r for r in fulls if "domain_fidelity" in r["curve"][0]]
    faint = [
        r["source"]
        for r in measured
        if not learns_domain(r) and votes.get(r["source"], {}).get("range", 1.0) < FAINT_VOTE
    ]
    faint_note = (
        f"; of the others, {len(faint)} where the vote is faint (range below {FAINT_VOTE}: the base "
        f"model already draws close to the held-out images): {', '.join(faint)}."
        if faint
        else "."
    )
    head = [
        "# The world of base model v2: does memorization happen, and can the metrics tell?",
        "",
        f"Generated by `python bench/world.py report` from {len(records)} task records in "
        "`bench/results/world/` (each names its config hash, fingerprints, seed and versions).",
        "",
        *acceptance(records),
        *(
            [
                f"- Full fine-tuning's samples resemble the domain at some checkpoint: "
                f"{sum(resembles(r) for r in fulls)} of {len(fulls)} sources."
            ]
            if fulls
            else []
        ),
        *(
            [
                f"- Full fine-tuning's samples reach the domain (domain fidelity at least {LEARNS_DOMAIN} at "
                f"some checkpoint: 0 = the base model's samples, 1 = held-out images): "
                f"{sum(learns_domain(r) for r in measured)} of {len(measured)} sources{faint_note}"
            ]
            if measured
            else []
        ),
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    out = ROOT / "docs" / "world.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.keep_prose and out.is_file():
        old = out.read_text()
        marker = "\n## Reading\n"
        text += old[old.index(marker) :] if marker in old else ""
    atomic_write_text(out, text)
    print(text)
    return 0


LEARNS_DOMAIN = 0.5
"""A fine-tune has learned the domain when its domain fidelity reaches this at some checkpoint."""


def learns_domain(r: dict[str, Any]) -> bool:
    """Whether some checkpoint's domain fidelity reaches :data:`LEARNS_DOMAIN`."""
    return any(c.get("domain_fidelity", math.nan) >= LEARNS_DOMAIN for c in r["curve"])


def fidelity_cells(r: dict[str, Any]) -> str:
    """Domain fidelity at 25, 100 and 400 steps (``-`` where a record predates the figure)."""
    at = {c["step"]: c.get("domain_fidelity", math.nan) for c in r["curve"]}
    return " / ".join(_fmt(at.get(step, math.nan)) for step in (25, 100, 400))


RESEMBLES = 3.0
"""Samples resemble the domain when their KID is below 1/RESEMBLES of the better control's
(noise or a constant image) on the same task."""


def resembles(r: dict[str, Any]) -> bool:
    """Whether some checkpoint's samples resemble the domain (:data:`RESEMBLES`)."""
    return (
        min(c["kid"] for c in r["curve"]) < min(r["controls"]["noise"], r["controls"]["constant"]) / RESEMBLES
    )


def acceptance(records: list[dict[str, Any]]) -> list[str]:
    """The issue's acceptance, counted: copies, resemblance, KID's controls, the base model."""

    def peak(r: dict[str, Any]) -> dict[str, Any]:
        return max(r["curve"], key=lambda c: (c["canary_copy_fraction"], -c["step"]))

    def count(rows: list[dict[str, Any]]) -> str:
        hit = sum(peak(r)["canary_copy_fraction"] > COPY_BAR for r in rows)
        return f"{hit} of {len(rows)}"

    groups = {
        "held out": [r for r in records if r["heldout"]],
        "training": [r for r in records if not r["heldout"]],
        "distinct images": [r for r in records if not r["patches"]],
        "patches": [r for r in records if r["patches"]],
    }
    controls_ok = sum(
        min(r["controls"]["noise"], r["controls"]["constant"]) > 5 * abs(r["controls"]["real"])
        for r in records
    )
    resembling = sum(resembles(r) for r in records)
    base_clean = sum(r["base"]["near_copy_fraction"] == 0 and r["base"]["extracted"] == 0 for r in records)
    return [
        f"- **Canary copy fraction above {COPY_BAR} at some checkpoint up to 400 steps, mask of ones: "
        f"{count(records)} tasks** ({'; '.join(f'{k} {count(v)}' for k, v in groups.items() if v)}).",
        f"- Samples resemble the domain at some checkpoint (KID below 1/{RESEMBLES:g} of the better of "
        f"the noise and constant controls' on the task): {resembling} of {len(records)} tasks.",
        f"- KID rates pure noise and a constant image at least 5x worse than other real images of the "
        f"source: {controls_ok} of {len(records)} tasks.",
        f"- The base model alone: no near copy and nothing extracted on {base_clean} of "
        f"{len(records)} tasks.",
        f"- Fine-tuning improves quality (held-out loss {IMPROVES:.0%} or more below the base model's at "
        f"some checkpoint, mask of ones): training {sum(improves(r) for r in groups['training'])} of "
        f"{len(groups['training'])}, held out {sum(improves(r) for r in groups['held out'])} of "
        f"{len(groups['held out'])}.",
    ]


IMPROVES = 0.05
"""Fine-tuning improves quality when the held-out loss falls this share below the base model's."""


def improves(r: dict[str, Any]) -> bool:
    """Whether some checkpoint's held-out loss is :data:`IMPROVES` below the base model's."""
    return min(c["heldout_loss"] for c in r["curve"]) < (1 - IMPROVES) * r["base"]["heldout_loss"]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="measure the tasks (resumes)")
    p_run.add_argument("--config", default="bench3")
    p_run.add_argument("--steps", type=int, default=400)
    p_run.add_argument("--shard", default="0/1", help="i/n: this worker's share of the tasks")
    p_run.add_argument("--tasks", nargs="*", help="only these tasks")
    p_run.add_argument(
        "--mask",
        choices=("ones", "full", "best"),
        default="ones",
        help="ones: every attention group, each task; full: every parameter, and best: the best mask of "
        "the curve tables (memorization weight 0.5), the first task of each source",
    )
    p_vote = sub.add_parser("vote", help="domain fidelity's vote range and base redraws per source")
    p_vote.add_argument("--config", default="bench3")
    p_report = sub.add_parser("report", help="write docs/world.md")
    p_report.add_argument("--config", default="bench3")
    p_report.add_argument("--keep-prose", action="store_true", help="keep the '## Reading' section")
    args = parser.parse_args(argv)
    return {"run": run, "vote": vote, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
