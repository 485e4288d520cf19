"""Controllers judged live: each runs real fine-tunes of named tasks (control mode, fine-tuned in
process), and each delivered model's reward is put on the recipes benchmark's regret scale from the
task's curve table (:func:`research.benchmark.recipes.regret_array`: 0 = the task's best stored
(mask, steps) at seed 0, 1 = its worst). A controller that changes groups mid-run
(``env.mask_changes=apply``, which replay cannot judge) is compared with a replay-trained one on
the same fine-tunes; a replay-trained controller judged live scores what replay gave it.

    python -m research.benchmark live --config bench3 --policy runs/A/policy.zip runs/B/policy.zip \\
        --tasks animals faces digits-invert
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from memrl.agents.policy import load_policy
from memrl.envs.control import ControlEnv, control_metrics

from memrl.config import Config
from memrl.curves import CurveTable, load_curves
from memrl.errors import ConfigError
from research.benchmark.recipes import PREFERENCES, regret_scale

__all__ = ["live_report", "live_rows"]

log = logging.getLogger(__name__)


def live_rows(cfg: Config, policies: list[Path], tasks: list[str]) -> list[dict[str, Any]]:
    """Every policy's guarded fine-tune of every task at every preference of :data:`PREFERENCES`,
    deterministic (a group trains, or the run stops, where its probability is above 1/2)."""
    table = load_curves(cfg, control_metrics(cfg))
    complete = table.complete()
    unknown = [t for t in tasks if t not in table.names or not complete[table.names.index(t)]]
    if unknown:
        raise ConfigError(
            f"--tasks {' '.join(unknown)}: no complete curves in this suite's table to score them against; "
            f"choose from {', '.join(n for n, ok in zip(table.names, complete) if ok)}"
        )
    rows = []
    for path in policies:
        policy = load_policy(path)
        if policy.card["action_mode"] != "control":
            raise ConfigError(f"--policy {path}: a {policy.card['action_mode']} policy, not a controller")
        changes = policy.config.env.mask_changes
        env_cfg = cfg.with_changes(
            {"env.mode": "control", "env.backend": "inprocess", "env.mask_changes": changes}
        )
        env = ControlEnv(env_cfg, tasks=[table.names.index(t) for t in tasks])
        for task in tasks:
            for w in PREFERENCES:
                start = time.perf_counter()
                obs, _ = env.reset(seed=0, options={"dataset": task, "preference": [w, 1.0 - w, 0.0]})
                done, masks = False, []
                while not done:
                    action = (policy.probabilities(obs) > 0.5).astype(np.int8)
                    obs, reward, done, _, info = env.step(action)
                    masks.append("".join(map(str, info["mask"])))
                rows.append(
                    {
                        "policy": str(path),
                        "mask_changes": changes,
                        "task": task,
                        "memorization_weight": w,
                        "regret": live_regret(table, cfg, task, w, reward),
                        "reward": reward,
                        "groups": " ".join(dict.fromkeys(masks)),
                        "delivered_steps": info["delivered_steps"],
                        "changes": info["mask_changes"],
                    }
                )
                log.info(
                    "%s on %s at w=%.2f: %s, %d steps, regret %.3f (%.0f s)",
                    path,
                    task,
                    w,
                    rows[-1]["groups"],
                    info["delivered_steps"],
                    rows[-1]["regret"],
                    time.perf_counter() - start,
                )
        env.close()
    return rows


def live_regret(table: CurveTable, cfg: Config, task: str, w: float, reward: float) -> float:
    """A live delivery's reward on the scale of :func:`research.benchmark.recipes.regret_array`."""
    best, worst = regret_scale(table, cfg.reward, table.names.index(task), w)
    return (best - reward) / max(best - worst, 1e-9)


def live_report(rows: list[dict[str, Any]]) -> str:
    """Per policy, task and preference: the groups it trained, the length and the regret; each
    policy's mean; with two policies, the mean paired difference (first minus second)."""
    lines = [
        "| policy | mask changes | task | w | groups (in order) | steps | regret |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['policy']} | {r['mask_changes']} | {r['task']} | {r['memorization_weight']} | "
        f"`{r['groups']}` | {r['delivered_steps']} | {r['regret']:+.3f} |"
        for r in rows
    ]
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r["regret"])
    lines += ["", "| policy | runs | mean regret | worst |", "|---|---|---|---|"]
    lines += [f"| {p} | {len(v)} | {np.mean(v):+.3f} | {max(v):+.3f} |" for p, v in by.items()]
    if len(by) == 2:
        first, second = by.values()
        diff = np.array(first) - np.array(second)
        lines += [
            "",
            f"Paired difference (first minus second): mean {diff.mean():+.3f} over {len(diff)} runs.",
        ]
    return "\n".join(lines)
