"""Reuse a trained policy on a new dataset: no new search.

    python -m memrl.apply_policy --data my_images/ --memorization-weight 0.7   # the shipped policy
    python -m memrl.apply_policy --policy runs/RUN/policy.zip --data my_images/ --out results/
    python -m memrl.apply_policy --policy runs/RUN --data set.npz --candidates 4 --budget 4

Checks the policy card against the base model's search space, computes the dataset descriptor,
takes the policy's mask (or evaluates its top candidates and keeps the best), then delivers a
model: a fine-tune with that mask on *all* the user's images except a held-out split (sized from
the data; no canaries, no duplication), saved as a plain diffusers folder (safetensors), and a
report of its memorization (near-copies calibrated on the held-out images, extraction, the
train/held-out loss gap) and quality beside full fine-tuning of every parameter under the same
protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memrl.agents.policy import default_policy, load_policy
from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config, dump_config
from memrl.data import fit_sizes, usable_count
from memrl.data.imageset import first_image, image_digests, resize_images
from memrl.envs.control import guarded_run
from memrl.errors import ConfigError, MemrlError
from memrl.metrics.quality import FAINT_VOTE
from memrl.peft_methods import merge_adapters
from memrl.report import pyplot, save_figure, task_rows
from memrl.reward import PREFERENCE_FIELDS, Reward, with_preference
from memrl.scoring import domain_fidelities, finetune_and_score, score_model
from memrl.searchers import CurveOracle, Knowledge, TaskOracle, make_searcher, run, spec_of
from memrl.store import EvaluationStore
from memrl.task import Task, TaskContext, architecture_space, full_unet, make_evaluator
from memrl.training import FinetuneResult
from memrl.utils import atomic_write_text, folder_lock, package_versions, setup_logging

__all__ = [
    "NEAR_DUPLICATE_RMS",
    "REPORT_METRICS",
    "SPLIT_FILE",
    "add_domain_fidelity",
    "apply",
    "choose_mask",
    "deliver",
    "delivery_config",
    "duplicate_note",
    "fidelity_note",
    "live_search",
    "main",
    "parse_args",
    "plot_search",
    "preference_sweep",
    "resize_figure",
    "search_section",
    "searches",
    "split_duplicates",
    "stored_terms",
    "sweep_section",
    "user_preference",
    "write_split",
]

log = logging.getLogger("memrl.apply_policy")

REPORT_METRICS = (
    "near_copy_fraction",
    "extracted",
    "loss_gap",
    "mia_auc_private",
    "mia_tpr_private",
    "nn_similarity_mean",
    "kid",
    "fid",
    "heldout_loss",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.apply_policy",
        description="Propose a fine-tuning mask for a new dataset with a trained policy, and apply it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy.zip or the run directory (default: the controller shipped with memrl, else its "
        "search policy; both trained on the MemControl-Bench training tasks)",
    )
    parser.add_argument(
        "--data", required=True, help="a folder of images (+ captions.csv), an .npz, or a bundled name"
    )
    parser.add_argument("--out", type=Path, default=Path("memrl-apply"), help="results folder")
    parser.add_argument("--candidates", type=int, default=1, help="consider the N most probable masks")
    parser.add_argument(
        "--budget",
        type=int,
        default=0,
        help="fine-tunes to search with: a search policy chooses each after seeing the results so far "
        "(after evaluating the two references); another policy evaluates its top candidates; with a "
        "controller, --searcher (default presets) chooses masks, each fine-tune is measured at every "
        "chunk and the best (mask, steps) is delivered. 0: the policy's zero-shot proposal or the "
        "controller's guarded fine-tune",
    )
    parser.add_argument(
        "--searcher",
        default="policy",
        help="with --budget: the search method (memrl.searchers; default the policy itself). Methods that "
        "transfer (portfolio, gp-prior, ...) read the training tasks' tables from the policy's prior",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="final fine-tune steps (default: 2 x finetune.steps)"
    )
    parser.add_argument(
        "--memorization-weight",
        type=float,
        default=None,
        help="your trade-off: weight of memorization in [0, 1] (quality gets 1 minus it unless "
        "--quality-weight is given); default: the policy's training weights",
    )
    parser.add_argument("--quality-weight", type=float, default=None, help="weight of quality")
    parser.add_argument("--param-weight", type=float, default=None, help="cost per trainable fraction")
    parser.add_argument(
        "--sweep",
        type=int,
        default=5,
        help="also evaluate the policy's masks for this many memorization weights from 0 to 1 and "
        "plot them on the task's quality/memorization plane (0: skip)",
    )
    add_config_args(
        parser,
        default=None,
        config_help="a config name or YAML path to use instead of the policy's training config (its base "
        "model and search space must be the policy's)",
    )
    return parser.parse_args(argv)


def user_preference(args: argparse.Namespace, policy: Any) -> np.ndarray:
    """The weights asked for on the command line, the rest from the policy's training config."""
    w = policy.preference().copy()
    if args.memorization_weight is not None:
        w[0] = args.memorization_weight
        w[1] = 1.0 - args.memorization_weight if args.quality_weight is None else args.quality_weight
    elif args.quality_weight is not None:
        w[1] = args.quality_weight
    if args.param_weight is not None:
        w[2] = args.param_weight
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ConfigError(
            f"--memorization-weight/--quality-weight/--param-weight give {w.tolist()}: weights must be "
            "finite and non-negative (the memorization weight at most 1 when the quality weight is implied)"
        )
    return w


def live_search(
    policy: Any,
    task: Any,
    budget: int,
    preference: np.ndarray,
    searcher: str = "policy",
    oracle: Any = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A search run live with registered ``searcher`` (default: the search policy itself): the two
    references first (no fine-tune, mask of ones), then ``budget`` fine-tunes, each printed as it
    finishes; ``oracle``: how a fine-tune is scored (default :class:`TaskOracle`, a fine-tune of the
    task's length). Returns the best mask and the trace."""

    trace: list[dict[str, Any]] = []

    def report(history: Any) -> None:
        trial, result = history.trials[-1], history.results[-1]
        best = max([history.baseline, *(r.reward for r in history.results)])
        trace.append(
            {
                **({"steps": int(result.metrics["step"])} if "step" in result.metrics else {}),
                "mask": trial.mask.tolist(),
                "reward": result.reward,
                "ok": result.ok,
                "best_so_far": float(best),
                "memorization_term": result.memorization,
                "quality_term": result.quality,
            }
        )
        at = f" at {trace[-1]['steps']} steps" if "steps" in trace[-1] else ""
        print(
            f"fine-tune {len(trace)}/{budget}: mask {''.join(map(str, trial.mask))}{at} "
            f"reward {result.reward:+.3f} (memorization {result.memorization:.3f}, "
            f"quality {result.quality:.3f}); best so far {best:+.3f}",
            flush=True,
        )

    knowledge = Knowledge(
        k=task.space.k,
        preference=policy.preference(preference),
        seed=task.cfg.seed,
        budget=budget,
        group_names=list(task.space.names),
        descriptor=task.descriptor(),
        prior=policy.prior,
        policy=policy,
    )
    oracle = oracle or TaskOracle(task, with_preference(task.cfg.reward, preference))
    history = run(make_searcher(searcher, knowledge), oracle, budget, on_result=report)
    best = history.best_index()
    if best is None or history.results[best].reward < history.baseline:
        log.warning("no searched mask beat the better reference; delivering the first mask searched")
        return history.masks[0], trace
    return history.masks[best], trace


def plot_search(trace: list[dict[str, Any]], baseline_note: str, path: Path) -> None:
    """Each fine-tune's reward and the best so far, in the order the search ran them."""
    plt = pyplot()

    steps = np.arange(1, len(trace) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(steps, [t["reward"] for t in trace], "o", label="reward of the fine-tune")
    ax.step(steps, [t["best_so_far"] for t in trace], where="post", label="best so far")
    for x, t in zip(steps, trace):
        ax.annotate("".join(map(str, t["mask"])), (x, t["reward"]), fontsize=6, rotation=30)
    ax.set_xlabel("fine-tune")
    ax.set_ylabel("reward (this preference)")
    ax.set_title(baseline_note, fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def searches(policy: Any, budget: int, searcher: str) -> bool:
    """Whether ``choose_mask`` runs a live search (else the policy's candidates are scored)."""
    return budget > 0 and (searcher != "policy" or policy.card["action_mode"] == "search")


def choose_mask(
    policy: Any, task: Any, candidates: int, budget: int, preference: np.ndarray, searcher: str = "policy"
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The best mask for ``preference``: the policy's zero-shot proposal at budget 0; after
    ``budget`` live fine-tunes, the best that ``searcher`` found (a search policy searches itself);
    for another policy, its best-rewarded top candidate."""

    if searches(policy, budget, searcher):
        return live_search(policy, task, budget, preference, searcher)
    masks = policy.candidates(task.descriptor(), max(candidates, 1), preference)
    if budget <= 0 or len(masks) == 1:
        return masks[0], []
    tried = []
    reward = with_preference(task.cfg.reward, preference)
    for mask in masks[:budget]:
        outcome = task.score(mask, reward)
        tried.append({"mask": mask.tolist(), "reward": outcome.reward, "ok": outcome.ok})
    best = max(range(len(tried)), key=lambda i: tried[i]["reward"])
    return masks[best], tried


def preference_sweep(policy: Any, task: Any, points: int, out: Path) -> list[dict[str, Any]]:
    """The policy's mask for ``points`` memorization weights from 0 to 1 (quality 1 minus it),
    each evaluated on the task (search protocol; a mask shared by several weights is evaluated
    once); writes ``preferences.png``, the masks on the quality/memorization plane."""
    plt = pyplot()

    base = policy.preference()
    rows = []
    for w in np.linspace(0.0, 1.0, points):
        preference = np.array([w, 1.0 - w, base[2]], dtype=np.float32)
        mask = policy.candidates(task.descriptor(), 1, preference)[0]
        outcome = task.score(mask)
        rows.append(
            {
                "memorization_weight": round(float(w), 3),
                "mask": "".join(map(str, mask)),
                "ok": outcome.ok,
                **{k: outcome.terms.get(k, float("nan")) for k in ("memorization_term", "quality_term")},
            }
        )
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    stored = stored_terms(task)
    if len(stored):
        ax.scatter(stored[:, 0], stored[:, 1], c="0.8", s=12, label="every stored mask of the task")
    ax.scatter(
        [0, 1], [1, 0], marker="s", facecolors="none", edgecolors="k", s=70, label="no fine-tune / all groups"
    )
    for r in rows:
        ax.scatter(
            r["memorization_term"],
            r["quality_term"],
            c=[[r["memorization_weight"], 0.2, 1 - r["memorization_weight"]]],
        )
        ax.annotate(
            f"w={r['memorization_weight']:.2f} {r['mask']}",
            (r["memorization_term"], r["quality_term"]),
            fontsize=7,
        )
    ax.set_xlabel("memorization term (0 = base model, 1 = all groups)")
    ax.set_ylabel("quality term (0 = all groups, 1 = no fine-tune)")
    ax.set_title("the policy's mask per memorization weight")
    ax.legend(fontsize=7)
    save_figure(fig, out / "preferences.png")
    plt.close(fig)
    return rows


def stored_terms(task: Any) -> np.ndarray:
    """(N, 2) memorization and quality terms of every stored evaluation of ``task`` (its store and
    tables; nothing is evaluated)."""

    ev = task.evaluator
    rows, _ = task_rows(task.cfg, [ev.store, *ev.tables])
    try:
        reward = Reward(task.cfg.reward, task.references())
    except RuntimeError:
        return np.zeros((0, 2))
    terms = [reward.terms(r) for r in rows]
    return np.array([[t["memorization_term"], t["quality_term"]] for t in terms]).reshape(-1, 2)


def sweep_section(rows: list[dict[str, Any]]) -> str:
    lines = "\n".join(
        f"| {r['memorization_weight']:.2f} | `{r['mask']}` | {r['memorization_term']:.3f} | "
        f"{r['quality_term']:.3f} |"
        for r in rows
    )
    return (
        "\n## The policy's masks across trade-offs\n\n| memorization weight | mask | memorization term | "
        f"quality term |\n|---|---|---|---|\n{lines}\n\n![preferences](preferences.png)\n"
    )


def search_section(trace: list[dict[str, Any]]) -> str:
    lines = "\n".join(
        f"| {i} | `{''.join(map(str, t['mask']))}` | {t['reward']:+.3f} | {t['memorization_term']:.3f} | "
        f"{t['quality_term']:.3f} | {t['best_so_far']:+.3f} |"
        for i, t in enumerate(trace, start=1)
    )
    return (
        "\n## The search\n\nEach fine-tune chosen after seeing the results before it (the references, "
        "no fine-tune and the mask of ones, were evaluated first).\n\n| # | mask | reward | memorization "
        f"term | quality term | best so far |\n|---|---|---|---|---|---|\n{lines}\n\n![search](search.png)\n"
    )


NEAR_DUPLICATE_RMS = 0.02
"""Two images closer than this RMS pixel distance (in [-1, 1] units, about 2.5 grey levels of 255)
count as near duplicates."""


def split_duplicates(splits: Any) -> dict[str, int]:
    """Held-out images that are exact or near duplicates of a fine-tune image: they make the copy
    threshold and membership inference meaningless (a copy looks like a held-out image)."""

    held, train = splits.heldout.images.flatten(1), splits.private.images.flatten(1)
    d = torch.cdist(held.float(), train.float()).min(dim=1).values / held.shape[1] ** 0.5
    exact = int((d == 0).sum())
    return {"exact": exact, "near": int((d < NEAR_DUPLICATE_RMS).sum()) - exact, "heldout": len(held)}


def duplicate_note(duplicates: dict[str, int]) -> str:
    if not (duplicates["exact"] or duplicates["near"]):
        return ""
    return (
        f"**Warning: {duplicates['exact']} of the {duplicates['heldout']} held-out images are exact and "
        f"{duplicates['near']} near duplicates of images fine-tuned on.** Near-copy counts and "
        "membership inference are calibrated on held-out images, so they cannot tell a copy from a "
        "held-out image here: remove the duplicates from your data and run again.\n\n"
    )


def delivery_config(cfg: Config, n_images: int, steps: int) -> Config:
    """The delivered model's protocol: every image but a held-out split (a fifth, 4 at least, at most
    ``data.heldout_size``), no canaries, no duplication, ``steps`` fine-tune steps."""
    heldout = min(cfg.data.heldout_size, max(4, n_images // 5))
    data = dataclasses.replace(
        cfg.data, private_size=n_images - heldout, heldout_size=heldout, canaries=0, duplication=1
    )
    return cfg.with_changes({"data": dataclasses.asdict(data), "finetune.steps": steps})


def deliver(cfg: Config, mask: np.ndarray, out: Path | None, store: Any) -> Any:
    """Fine-tune with ``mask`` under ``cfg``, score it, store the evaluation; save the merged model
    to ``out`` when given."""

    ctx = TaskContext.get(cfg)
    try:
        model, result = finetune_and_score(ctx, mask)
    except FloatingPointError as exc:
        raise MemrlError(f"the final fine-tune of mask {''.join(map(str, mask))} failed: {exc}") from None
    store.put(result, ctx.spec(mask))
    if out is not None:
        merge_adapters(model.unet)
        model.save(out)
    return result


def guard(
    policy: Any, task: Any, final_cfg: Config, preference: np.ndarray, chunk: int, out: Path
) -> tuple[np.ndarray, list[dict[str, Any]], Any]:
    """A controller's guarded fine-tune of the delivered protocol: it picks the mask and stops the
    run on its signals (measured on the held-out fifth). Saves the model to ``out/model`` and the
    run's signals with the stop marked to ``out/control.png``; returns the mask, the trace and the
    delivered model's evaluation."""
    ctx = TaskContext.get(final_cfg)
    model, mask, trace = guarded_run(policy, ctx, task.descriptor(), policy.preference(preference), chunk)
    evaluation = score_model(model, ctx, mask, FinetuneResult())
    merge_adapters(model.unet)
    model.save(out / "model")
    plot_control(trace, out / "control.png")
    log.info("the controller stopped at step %d of %d", trace[-1]["steps"], final_cfg.finetune.steps)
    return mask, trace, evaluation


FIDELITY_WARNING = 0.5
"""Below this domain fidelity, with full fine-tuning at least :data:`FIDELITY_GAP` higher, the
report says the delivered model may not have learned the data's domain."""
FIDELITY_GAP = 0.25


def add_domain_fidelity(cfg: Config, chosen: Any, full: Any) -> str:
    """Each evaluation's ``domain_fidelity`` (:func:`memrl.scoring.domain_fidelities`) into its
    metrics; returns the report's warning when the delivered model did not learn the domain
    (:func:`fidelity_note`), logged too."""
    ctx = TaskContext.get(cfg)
    figures = domain_fidelities(ctx, [chosen, full])
    for evaluation, f in zip((chosen, full), figures, strict=True):
        evaluation.metrics["domain_fidelity"] = f["fidelity"]
    note = fidelity_note(figures[0]["fidelity"], figures[1]["fidelity"], figures[0]["range"])
    if note:
        log.warning(note.strip())
    return note


def fidelity_note(chosen: float, full: float, vote_range: float = 1.0) -> str:
    """The report's warning when the delivered model still draws like the base model while full
    fine-tuning draws the data; where the vote is faint (``vote_range`` below
    :data:`memrl.metrics.quality.FAINT_VOTE`: the base model already draws close to the data), a
    note that the figures cannot tell. Empty otherwise, or when a figure is missing."""
    if vote_range < FAINT_VOTE:
        return (
            f"Domain fidelity is faint here: the base model's samples are hard to tell from your held-out "
            f"images (the vote separates them by {vote_range:.2f} of 1), so the delivered model's "
            f"{chosen:.2f} and full fine-tuning's {full:.2f} move by about 0.25 between draws. Judge the "
            "domain by the samples.\n\n"
        )
    if not (chosen < FIDELITY_WARNING and full >= chosen + FIDELITY_GAP):
        return ""
    return (
        f"**The delivered model may not have learned your images' domain**: its samples' domain fidelity "
        f"is {chosen:.2f} (0 = the base model's samples, 1 = your held-out images) against {full:.2f} for "
        "full fine-tuning. Its low memorization may only mean it learned little; look at its samples, "
        "and a lower --memorization-weight trades memorization for the domain.\n\n"
    )


def plot_control(trace: list[dict[str, Any]], path: Path) -> None:
    """The run's signals at every pause, the stop marked."""
    plt = pyplot()
    points = [t for t in trace if "heldout_loss_ratio" in t]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in ("heldout_loss_ratio", "train_loss_ratio", "mia_auc_private"):
        ax.plot([t["steps"] for t in points], [t[name] for t in points], "o-", label=name)
    ax.axvline(trace[-1]["steps"], color="k", linestyle="--", label="delivered")
    ax.set_xlabel("fine-tune step")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def control_section(trace: list[dict[str, Any]]) -> str:
    """The report's account of the controller's run."""
    rows = "\n".join(
        f"| {t['steps']} | {t.get('heldout_loss_ratio', float('nan')):.3f} | "
        f"{t.get('mia_auc_private', float('nan')):.3f} | `{''.join(map(str, t.get('mask', [])))}` | "
        f"{'stop' if t['stop'] else 'go on'} |"
        for t in trace
    )
    return (
        f"\n## The controller's run\n\nStopped at step {trace[-1]['steps']}. Signals on the held-out images "
        "at every pause (held-out loss relative to the base model's; membership AUC of the training "
        "images) and the groups trained up to it:\n\n"
        "| step | held-out loss ratio | membership AUC | groups | decision |\n|---|---|---|---|---|\n"
        f"{rows}\n\n![signals](control.png)\n"
    )


SPLIT_FILE = "split.json"
"""Which of the user's images the delivered model was fine-tuned on and which it never saw
(``python -m memrl.audit --from`` reads it)."""


def write_split(path: Path, source: str, splits: Any) -> None:
    """Record the delivered fine-tune's split: each image's file name (folders) and pixel digest."""

    record = {
        "source": source,
        **{
            f"{name}_{key}": value
            for name, part in (("train", splits.private), ("heldout", splits.heldout))
            for key, value in (("files", part.files), ("digests", image_digests(part.images)))
        },
    }
    atomic_write_text(path, json.dumps(record, indent=1))


def apply(args: argparse.Namespace) -> Path:
    """Propose, deliver and report; ``--out`` is held (locked) from the moment it is created."""
    with contextlib.ExitStack() as stack:
        return _apply(args, stack)


def _apply(args: argparse.Namespace, stack: contextlib.ExitStack) -> Path:

    if args.steps is not None and args.steps < 1:
        raise ConfigError(
            f"--steps={args.steps}: the delivered fine-tune needs 1 step or more (0 would deliver the "
            "untouched base model as if fine-tuned); leave it out for 2 x finetune.steps"
        )
    if args.budget < 0 or args.candidates < 1 or args.sweep < 0:
        raise ConfigError(
            f"--budget={args.budget}, --candidates={args.candidates}, --sweep={args.sweep}: the budget "
            "and sweep must be 0 or more and the candidates 1 or more"
        )
    spec_of(args.searcher)  # an unknown name fails before any work
    if args.policy is None:
        args.policy = default_policy()
    policy = load_policy(args.policy)
    cfg = config_from_args(args, base=policy.config).with_changes(  # config, then --set, then flags
        {
            "data.source": args.data,
            "env.tasks": [],
            "env.table": None,
            "env.backend": "inprocess",
            "env.store": str((args.out / "evaluations.sqlite").resolve()),
        }
    )
    n_images = usable_count(cfg.data)
    search_cfg = cfg.with_changes({"data": dataclasses.asdict(fit_sizes(cfg.data, n_images))})
    task = Task(search_cfg, make_evaluator(search_cfg), name=str(args.data))
    policy.check_space(task.space)
    preference = user_preference(args, policy)
    stack.enter_context(folder_lock(args.out))
    setup_logging(log_file=args.out / "apply.log")
    controller = policy.card["action_mode"] == "control"
    store = EvaluationStore(cfg.env.store)
    if controller:  # it decides during one fine-tune: the mask and when to stop
        steps = args.steps if args.steps is not None else cfg.finetune.steps  # the controller's horizon
        chunk = int(policy.config.env.chunk or policy.config.finetune.checkpoint_every or steps)
        if steps % chunk:
            raise ConfigError(f"--steps {steps} must be a multiple of the controller's chunk ({chunk} steps)")
        sweep = []
        if args.budget:  # search (mask, length): checkpointed fine-tunes, the best checkpoint delivered
            searcher = "presets" if args.searcher == "policy" else args.searcher
            curves = CurveOracle(task, chunk, steps, with_preference(task.cfg.reward, preference))
            mask, tried = live_search(policy, task, args.budget, preference, searcher, curves)
            steps = curves.best_steps.get(tuple(int(v) for v in mask), steps)
            final_cfg = delivery_config(cfg, n_images, steps)
            plot_search(tried, f"search on {args.data}: {args.budget} fine-tunes", args.out / "search.png")
            controller, searched = False, True  # delivered like a searched mask, at the length found
        else:
            final_cfg = delivery_config(cfg, n_images, steps)
            mask, tried, delivered = guard(policy, task, final_cfg, preference, chunk, args.out)
            searched = False
    else:
        mask, tried = choose_mask(policy, task, args.candidates, args.budget, preference, args.searcher)
        searched = searches(policy, args.budget, args.searcher)
        if searched:
            plot_search(tried, f"search on {args.data}: {args.budget} fine-tunes", args.out / "search.png")
        sweep = preference_sweep(policy, task, args.sweep, args.out) if args.sweep > 0 else []
        steps = args.steps if args.steps is not None else 2 * cfg.finetune.steps
        final_cfg = delivery_config(cfg, n_images, steps)
    dump_config(final_cfg, args.out / "config.yaml")
    log.info("mask %s: %s", "".join(map(str, mask)), task.space.selected(mask))
    empty = (
        ""
        if mask.any()
        else "The policy proposes no fine-tuning for this trade-off: at these weights it expects no mask "
        "to beat the base model. The delivered model is the base model; a lower --memorization-weight "
        "trades memorization for quality.\n\n"
    )
    if empty:
        log.warning(empty.strip())
    duplicates = split_duplicates(TaskContext.get(final_cfg).splits)
    if duplicates["exact"] or duplicates["near"]:
        log.warning(duplicate_note(duplicates).strip())
    if controller:
        chosen = delivered
    else:
        chosen = deliver(final_cfg, mask, args.out / "model", store)
    # The comparison is true full fine-tuning: every group at block granularity = every parameter.
    whole = full_unet(final_cfg)
    full = deliver(whole, np.ones(architecture_space(whole).k, dtype=np.int8), None, store)
    domain_note = add_domain_fidelity(final_cfg, chosen, full)
    keys = (*REPORT_METRICS, "domain_fidelity", "trainable_fraction")
    result = {
        "mask": mask.tolist(),
        "groups": task.space.selected(mask),
        "preference": dict(zip(PREFERENCE_FIELDS, preference.tolist())),
        ("control_trace" if controller else "search_trace" if searched else "candidates_tried"): tried,
        "split_duplicates": duplicates,
        "sweep": sweep,
        "descriptor": task.descriptor().tolist(),
        "images": n_images,
        "finetuned_on": final_cfg.data.private_size,
        "heldout": final_cfg.data.heldout_size,
        "chosen": {k: chosen.metrics[k] for k in keys},
        "full_finetune": {k: full.metrics[k] for k in keys},
        "final_steps": steps,
        "seed": final_cfg.seed,
        "data_fingerprint": TaskContext.get(final_cfg).fingerprints["data"],
        "policy": str(args.policy),
        "policy_config_hash": policy.card["config_hash"],
        "versions": package_versions(),
    }
    atomic_write_text(args.out / "result.json", json.dumps(result, indent=2))
    write_split(args.out / SPLIT_FILE, str(args.data), TaskContext.get(final_cfg).splits)
    rows = "\n".join(f"| {k} | {chosen.metrics[k]:.4f} | {full.metrics[k]:.4f} |" for k in keys)
    report = (
        f"# memrl apply: {args.data}\n\nPolicy `{args.policy}` proposed mask "
        f"`{''.join(map(str, mask))}` = {', '.join(task.space.selected(mask)) or '(none)'}.\n"
        f"Delivered model: {steps} fine-tune steps on {final_cfg.data.private_size} of the {n_images} "
        f"images ({final_cfg.data.heldout_size} held out to measure memorization and quality); saved to "
        f"`model/` (diffusers UNet, safetensors).\n\n"
        f"{empty}{domain_note}{duplicate_note(duplicates)}"
        f"| metric | chosen mask | full fine-tune (every parameter) |\n|---|---|---|\n{rows}\n\n"
        "near_copy_fraction: share of samples closer to a training image than 99% of held-out images "
        "are; loss_gap: held-out minus training denoising loss (a membership signal); extracted: "
        "training images reproduced by a clique of samples; mia_auc_private / mia_tpr_private: "
        "membership inference from each image's denoising loss (ROC AUC, 0.5 = chance; true-positive "
        "rate at a 1% false-positive rate), training images against held-out ones; domain_fidelity: where "
        "the samples lie between the base model's samples (0) and the held-out images (1), which KID and "
        "held-out loss cannot tell apart on a domain the base model never drew.\n"
        + (search_section(tried) if searched else "")
        + (control_section(tried) if controller else "")
        + (sweep_section(sweep) if sweep else "")
    )
    resized = resize_figure(str(args.data), final_cfg.data.resolution, args.out / "resized.png")
    atomic_write_text(args.out / "report.md", report + resized)
    return args.out


def resize_figure(source: str, side: int, path: Path) -> str:
    """When the user's images are resized to the model's resolution: the first of them before and
    after (``resized.png``) and the report's paragraph saying so; else nothing."""
    plt = pyplot()

    before = first_image(source)
    if before is None or before.shape[-2:] == (side, side):
        return ""
    after = resize_images(torch.from_numpy(before)[None] * 2 - 1, side)[0]
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
    height, width = before.shape[-2:]
    for ax, image, title in (
        (axes[0], before, f"as given, {width}x{height} px"),
        (axes[1], ((after + 1) / 2).numpy(), f"as trained on, {side}x{side} px"),
    ):
        shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, path)
    plt.close(fig)
    return (
        f"\n**Your images were resized** from {width}x{height} px to the model's {side}x{side} px "
        "(`data.resolution`): memorization and quality are measured at that size. The first of them, "
        "before and after:\n\n![resized](resized.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def body() -> int:
        out = apply(args)
        print(f"results: {out / 'report.md'}")
        return 0

    return run_main(body, interrupted=f"evaluations so far are stored in {args.out / 'evaluations.sqlite'}")


if __name__ == "__main__":
    sys.exit(main())
