"""The policy that ships with memrl, and the benchmark numbers its card carries."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config, load_config
from research.benchmark.folds import SPLITS, split_of
from research.benchmark.stats import iqm

__all__ = ["ship", "transfer_numbers"]


def ship(cfg: Config, out: Path, results: Path) -> Path:
    """Train the policy that ships with memrl: PPO by replay on every training task of the suite
    whose table is complete (see :func:`memrl.train_agent.train`), with uniformly drawn
    preferences; write ``policy.zip`` and its card to ``out``. The card carries the transfer
    benchmark's numbers from ``results/transfer.csv`` (the same recipe, judged leave-one-task-out
    and on the held-out tasks); both paths are checked before any training."""
    import json
    import shutil
    import tempfile

    from memrl.agents.policy import card_path, prior_path, read_card

    from memrl.errors import MemrlError
    from memrl.train_agent import train
    from memrl.utils import atomic_path, atomic_write_text

    if not (results / "transfer.csv").is_file():
        raise MemrlError(
            f"--results {results}: no transfer.csv here, so the policy card would ship without its "
            "benchmark numbers; point --results at the transfer run's results (bench/results/benchmark)"
        )
    if out.exists() and not out.is_dir():
        raise MemrlError(f"--to {out}: exists and is not a folder; name the folder the policy goes to")

    ship_cfg = cfg.with_changes({"env.preferences": "uniform", "env.store": None})
    with tempfile.TemporaryDirectory() as tmp:
        policy = train(ship_cfg, Path(tmp) / "run", report=False)
        card = read_card(card_path(policy))
        ship_cfg = load_config(card["config"], {"env.store": None})  # without the run's store
        card["config"], card["config_hash"] = ship_cfg.to_dict(), ship_cfg.hash()
        card["benchmark"] = transfer_numbers(results / "transfer.csv")
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


def _by_fine_tunes(rows: list[dict[str, str]]) -> dict[int, float]:
    """Mean regret at each number of fine-tunes."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(int(r["fine_tunes"]), []).append(float(r["regret"]))
    return {n: round(float(np.mean(v)), 4) for n, v in sorted(by.items())}
