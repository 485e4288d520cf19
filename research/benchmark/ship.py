"""The policy that ships with memrl, and the benchmark numbers its card carries."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config, load_config
from research.benchmark.folds import SPLITS, split_of
from research.benchmark.stats import iqm

__all__ = ["recipe_numbers", "ship", "transfer_numbers"]


def ship(cfg: Config, out: Path, results: Path) -> Path:
    """Train the policy that ships with memrl: PPO by replay on every training task of the suite
    whose table is complete (see :func:`memrl.train_agent.train`), with uniformly drawn
    preferences; write ``policy.zip`` and its card to ``out``. The card carries the benchmark's
    numbers for the same recipe, judged on held-out tasks and left-out folds: a search policy's from
    ``results/transfer.csv``, a controller's (``env.mode=control``) from ``results/recipes.csv``;
    both paths are checked before any training."""
    import json
    import shutil
    import tempfile

    from memrl.agents.policy import card_path, prior_path, read_card

    from memrl.errors import MemrlError
    from memrl.train_agent import train
    from memrl.utils import atomic_path, atomic_write_text

    control = cfg.env.mode == "control"
    numbers, command = ("recipes.csv", "recipes") if control else ("transfer.csv", "transfer")
    if not (results / numbers).is_file():
        raise MemrlError(
            f"--results {results}: no {numbers} here, so the policy card would ship without its "
            f"benchmark numbers; point --results at the folder python -m research.benchmark {command} "
            "wrote (bench/results/benchmark)"
        )
    if out.exists() and not out.is_dir():
        raise MemrlError(f"--to {out}: exists and is not a folder; name the folder the policy goes to")

    ship_cfg = cfg.with_changes({"env.preferences": "uniform"})  # the store is left off the card below
    with tempfile.TemporaryDirectory() as tmp:
        policy = train(ship_cfg, Path(tmp) / "run", report=False)
        card = read_card(card_path(policy))
        ship_cfg = load_config(card["config"], {"env.store": None})  # without the run's store
        card["config"], card["config_hash"] = ship_cfg.to_dict(), ship_cfg.hash()
        card["benchmark"] = (recipe_numbers if control else transfer_numbers)(results / numbers)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "policy.zip") as dest:
            shutil.copyfile(policy, dest)
        if prior_path(policy).is_file():
            with atomic_path(prior_path(out / "policy.zip")) as dest:
                shutil.copyfile(prior_path(policy), dest)
        atomic_write_text(card_path(out / "policy.zip"), json.dumps(card, indent=2))
    return out / "policy.zip"


def transfer_numbers(path: Path) -> dict[str, Any]:
    """Per method, from ``transfer.csv``: mean and IQM regret of its first mask (1 fine-tune), its
    mean regret at every number of fine-tunes it was judged at, and the number of tasks, on each
    split (leave one task out, leave one source out, held out). These come from the benchmark's
    per-fold policies (trained without the test task), not from the shipped policy, which is
    trained once, with one seed, on every training task."""
    with path.open(newline="") as fh:
        every = list(csv.DictReader(fh))
    rows = [r for r in every if int(r["fine_tunes"]) == 1]
    out: dict[str, Any] = {
        "source": str(path),
        "seeds": len({r["seed"] for r in rows}),
        "note": "numbers of the per-fold policies of the transfer benchmark (1 fine-tune each); the "
        "shipped policy is trained once, with one seed, on every training task",
    }
    for method in dict.fromkeys(r["method"] for r in every):
        out[method] = {}
        for split, label in zip(("loto", "loso", "heldout"), SPLITS):
            judged = [r for r in every if r["method"] == method and split_of(r) == label]
            if not judged:
                continue
            entry: dict[str, Any] = {
                "tasks": len({r["task"] for r in judged}),
                "mean_regret_by_fine_tunes": _by_fine_tunes(judged),
            }
            first = np.array([float(r["regret"]) for r in judged if int(r["fine_tunes"]) == 1])
            if len(first):
                entry.update(mean_regret=round(float(first.mean()), 4), iqm_regret=round(iqm(first), 4))
            out[method][split] = entry
    return out


def recipe_numbers(path: Path) -> dict[str, Any]:
    """Per method (rule or controller), from ``recipes.csv``: mean, IQM and worst regret over every
    (task, preference, seed) row and the number of tasks, on each split, for every budget of
    fine-tunes it was judged at. A controller's numbers come from the benchmark's per-fold
    controllers (trained without the test task), not from the shipped one."""
    with path.open(newline="") as fh:
        every = list(csv.DictReader(fh))
    out: dict[str, Any] = {
        "source": str(path),
        "seeds": len({r["seed"] for r in every if r.get("seed") not in (None, "")}),
        "note": "numbers of the recipes benchmark's per-fold rules and controllers; the shipped "
        "controller is trained once, with one seed, on every training task",
    }
    for row in every:
        key = row["method"] if row["fine_tunes"] == "1" else f"{row['method']}@{row['fine_tunes']}"
        out.setdefault(key, {}).setdefault(row["split"], []).append(row)
    for key, by_split in list(out.items()):
        if key in ("source", "seeds", "note"):
            continue
        for split, rows in by_split.items():
            regret = np.array([float(r["regret"]) for r in rows])
            by_split[split] = {
                "tasks": len({r["task"] for r in rows}),
                "mean_regret": round(float(regret.mean()), 4),
                "iqm_regret": round(iqm(regret), 4),
                "worst_regret": round(float(regret.max()), 4),
            }
    return out


def _by_fine_tunes(rows: list[dict[str, str]]) -> dict[int, float]:
    """Mean regret at each number of fine-tunes."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(int(r["fine_tunes"]), []).append(float(r["regret"]))
    return {n: round(float(np.mean(v)), 4) for n, v in sorted(by.items())}
