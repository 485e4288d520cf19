"""Train a PPO agent on MemControl-v0.

    python -m memrl.train_agent                                   # embedded default, CPU, minutes
    python -m memrl.train_agent --config configs/my.yaml --set ppo.total_timesteps=256 env.mode=sequential
    python -m memrl.train_agent --resume runs/20261127-221500-ab12cd34

The run directory holds the resolved config, ``run.json`` (seed, config hash, package versions,
task fingerprints, and ``status``: running, complete, interrupted or failed), the evaluation
store, TensorBoard logs (``tb/``), a resumable checkpoint, ``episodes.jsonl``, and at the end
``policy.zip`` with its card ``policy.card.json`` and a report (``report.md`` + plots).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from memrl.agents.policy import load_policy, prior_path, write_card
from memrl.agents.ppo import (
    AtomicCheckpoint,
    EvaluationLogger,
    ProgressLog,
    build_ppo,
    load_checkpoint,
    make_env,
)
from memrl.apply_policy import preference_sweep, sweep_section
from memrl.backends import run_inprocess
from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config, dump_config
from memrl.errors import ConfigError, MemrlError
from memrl.evaluator import command_store
from memrl.report import write_report
from memrl.runs import STORE_FILE, RunFolder
from memrl.searchers import TaskOracle
from memrl.store import EvaluationStore
from memrl.tables import complete_tasks
from memrl.task import Task, TaskContext, architecture_space, make_evaluator, suite
from memrl.utils import atomic_write_text, package_versions, setup_logging

__all__ = [
    "live_check",
    "main",
    "parse_args",
    "record_run",
    "replayed_search",
    "report_task",
    "resolve_run",
    "train",
]

log = logging.getLogger("memrl.train_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.train_agent",
        description="Train a PPO agent that chooses which UNet modules to fine-tune (MemControl-v0).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_args(parser)
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where results go (default: runs/<time>-<hash>)"
    )
    parser.add_argument("--resume", type=Path, default=None, help="continue the run in this directory")
    parser.add_argument(
        "--timesteps", type=int, default=None, help="total env steps (= evaluations); ppo.total_timesteps"
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return parser.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run directory: fresh from the arguments, or read back for ``--resume``."""
    if args.resume is not None:
        run_dir = args.resume
        if not RunFolder(run_dir).config.is_file():
            raise ConfigError(f"{run_dir}: no config.yaml here; --resume takes a run directory")
        args.config = RunFolder(run_dir).config
        return config_from_args(args, **{"ppo.total_timesteps": args.timesteps}), run_dir
    cfg = config_from_args(args, **{"ppo.total_timesteps": args.timesteps})
    if cfg.env.store is None:
        cfg.env.store = STORE_FILE  # inside the run directory (memrl.evaluator.command_store)
    run_dir = args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.hash()[:8]}"
    return cfg, run_dir


def record_run(cfg: Config, run_dir: Path, status: str, extra: dict[str, Any] | None = None) -> None:
    """``run.json``: seed, config hash, versions, task fingerprints and the run's status."""

    tasks = [
        {"name": e.name, "heldout": e.heldout, **TaskContext.get(e.cfg).fingerprints} for e in suite(cfg)
    ]
    meta = {
        "status": status,
        "seed": cfg.seed,
        "config_hash": cfg.hash(),
        "versions": package_versions(),
        "tasks": tasks,
        **(extra or {}),
    }
    atomic_write_text(RunFolder(run_dir).record, json.dumps(meta, indent=2))


def _learn(cfg: Config, run_dir: Path, resume: bool) -> tuple[Any, Any, Any]:
    """Build the env and PPO (resuming a checkpoint), learn, and check that some evaluation
    succeeded. Returns the model, the episode logger and the env."""

    env = make_env(cfg, cfg.ppo.n_envs, cfg.seed)
    model = build_ppo(cfg, env, run_dir)
    checkpoint = RunFolder(run_dir).checkpoint
    if resume and checkpoint.is_file():
        load_checkpoint(model, checkpoint)
        log.info("resumed from %s at %d timesteps", checkpoint, model.num_timesteps)
    logger = EvaluationLogger(run_dir)
    saver = AtomicCheckpoint(run_dir)
    remaining = cfg.ppo.total_timesteps - model.num_timesteps
    try:
        if remaining > 0:
            model.learn(
                remaining,
                callback=[logger, saver, ProgressLog(remaining)],
                progress_bar=True,
                reset_num_timesteps=not resume,
                tb_log_name="ppo",
            )
            saver.save()
    except KeyboardInterrupt:
        record_run(cfg, run_dir, "interrupted", {"num_timesteps": int(model.num_timesteps)})
        raise
    finally:
        env.close()
    if logger.episodes and logger.failures == logger.episodes:
        raise MemrlError(
            f"every one of the {logger.episodes} evaluations failed (see {run_dir / 'episodes.jsonl'}); "
            "no policy was written: fix the config (finetune.lr? data?) and run again"
        )
    return model, logger, env


def train(cfg: Config, run_dir: Path, resume: bool = False, report: bool = True) -> Path:
    """Build env and PPO, learn, save policy + card, write the report. Returns the policy path.

    Everything that can fail on bad input is built before the run directory is written; the
    directory's ``run.json`` says whether the run completed.
    """

    left_out: list[str] = []
    if cfg.env.backend == "replay" and cfg.env.table and not cfg.env.replay_fallback:
        tasks, left_out = complete_tasks(cfg)
        if not any(not t.get("heldout") for t in tasks):
            raise MemrlError(
                f"no training task of env.table={cfg.env.table} is complete; continue the table with "
                "python -m memrl.tables build, or set env.replay_fallback=true to fine-tune what it lacks"
            )
        if left_out:
            log.warning(
                "training without %s: the table lacks some of their masks (python -m memrl.tables "
                "status; env.replay_fallback=true fine-tunes them)",
                ", ".join(left_out),
            )
            cfg = cfg.with_changes({"env.tasks": tasks})
    store = cfg.env.store or STORE_FILE  # kept as given in the run's config.yaml
    cfg = cfg.with_changes({"env.store": str(command_store(cfg, run_dir))})
    entries = suite(cfg)
    for e in entries:  # every task's data, base model and space load before anything is written
        _ = TaskContext.get(e.cfg).fingerprints
    if Path(store).is_absolute():  # a store outside the run is opened (and refused) first
        EvaluationStore(store)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(log_file=RunFolder(run_dir).log)
    log.info("log: %s (every line of this run, with its time)", RunFolder(run_dir).log)
    dump_config(cfg.with_changes({"env.store": store}), RunFolder(run_dir).config)
    record_run(cfg, run_dir, "running")
    try:
        model, logger, env = _learn(cfg, run_dir, resume)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record_run(cfg, run_dir, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    policy_path = RunFolder(run_dir).policy
    model.save(policy_path)
    extra: dict[str, Any] = {"num_timesteps": int(model.num_timesteps), "tasks_left_out": left_out}
    if cfg.env.mode == "search":  # the search policy scores masks with its training tasks' tables
        prior = env.get_attr("prior")[0]
        prior.save(prior_path(policy_path))
        extra["prior"] = {"tasks": prior.names, "file": prior_path(policy_path).name}
    write_card(policy_path, architecture_space(cfg), cfg, env.observation_space.shape[0], extra)
    record_run(cfg, run_dir, "complete", {"num_timesteps": int(model.num_timesteps)})
    if report and cfg.env.mode == "control":
        log.info("a controller's run: its episodes are in %s and TensorBoard (no task report yet)", run_dir)
    elif report:
        report_task(cfg, policy_path, run_dir)
    return policy_path


def report_task(cfg: Config, policy_path: Path, run_dir: Path) -> None:
    """The report on the first held-out task (else the first training task): the trained policy's
    mask on the Pareto plot of every stored mask, its masks across preferences when it was trained
    on a range of them, and, when the evaluations came from a table, one live fine-tune of its mask
    printed beside the table's row for the same spec (``check.json``)."""

    entries = suite(cfg)
    target = next((e for e in entries if e.heldout), None) or entries[0]
    # A replayed run falls back to live fine-tunes for masks its table lacks.
    evaluator = make_evaluator(cfg.with_changes({"env.replay_fallback": True}))
    task = Task(target.cfg, evaluator, target.name, target.heldout)
    policy = load_policy(policy_path)
    sections = []
    if policy.card["action_mode"] == "search":
        chosen, section = replayed_search(policy, task)
        sections.append(section)
    else:
        chosen = policy.candidates(task.descriptor(), 1)[0]
    if cfg.env.table:
        sections.append(live_check(task, chosen, run_dir))
    else:
        task.score(chosen)
    if cfg.env.preferences != "fixed":
        sections.append(sweep_section(preference_sweep(policy, task, 5, run_dir)))
    write_report(
        run_dir,
        cfg,
        chosen=[int(v) for v in chosen],
        task_cfg=target.cfg,
        sections=sections,
        task_name=f"{task.name} (held out: never trained on)" if task.heldout else task.name,
    )


def replayed_search(policy: Any, task: Any) -> tuple[Any, str]:
    """A search policy's search of ``policy.budget`` masks on ``task`` (stored evaluations where
    the table has them, live fine-tunes otherwise); returns its best mask and a Markdown section."""

    history = policy.search(task.descriptor(), TaskOracle(task), policy.budget)
    best = history.best_index()
    chosen = history.masks[0 if best is None else best]
    log.info(
        "search on %s: best mask %s after %d fine-tunes", task.name, "".join(map(str, chosen)), policy.budget
    )
    lines = [
        f"| {i} | `{''.join(map(str, t.mask))}` | {r.reward:+.3f} | {r.memorization:.3f} | {r.quality:.3f} |"
        for i, (t, r) in enumerate(zip(history.trials, history.results), 1)
    ]
    section = (
        f"\n## The search policy on `{task.name}`\n\n{policy.budget} masks, each chosen after the results "
        "before it (rewards at the training preference; the better reference scores "
        f"{history.baseline:+.3f}); "
        f"best: `{''.join(map(str, chosen))}`.\n\n| # | mask | reward | memorization term | quality term |\n"
        "|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    return chosen, section


def live_check(task: Any, mask: Any, run_dir: Path) -> str:
    """Fine-tune ``mask`` on ``task`` live and compare with the table's row for the same spec;
    the live evaluation goes to the run's store (its samples feed the report's grid). Returns the
    Markdown section and writes ``check.json``."""

    spec = task.context.spec(mask)
    stored = next((row for t in task.evaluator.tables if (row := t.get(spec.hash)) is not None), None)
    log.info("live check: fine-tuning mask %s on %s (~30 s)", "".join(map(str, mask)), task.name)
    live = run_inprocess(spec)
    task.evaluator.store.put(live, spec)
    r = task.cfg.reward
    wanted = (r.memorization, r.quality, "near_copy_fraction", "canary_copy_fraction", "kid", "fid")
    keys = [k for k in dict.fromkeys(wanted) if k in live.metrics]
    check = {
        "task": task.name,
        "mask": "".join(map(str, mask)),
        "spec_hash": spec.hash,
        "live": {k: live.metrics[k] for k in keys},
        "table": {k: stored.metrics.get(k) if stored else None for k in keys},
        "live_seconds": live.timings.get("total"),
    }
    atomic_write_text(RunFolder(run_dir).check, json.dumps(check, indent=2))

    def value(v: float | None) -> str:
        return "not in the table" if v is None else f"{v:.4f}"

    rows = "\n".join(f"| {k} | {value(check['live'][k])} | {value(check['table'][k])} |" for k in keys)
    print(f"\nlive check of the policy's mask {check['mask']} on {task.name}:\n{'metric':>22}  live    table")
    for k in keys:
        print(f"{k:>22}  {value(check['live'][k])}  {value(check['table'][k])}")
    return (
        f"\n## Live check\n\nThe policy's mask `{check['mask']}` on `{task.name}`, fine-tuned again now "
        f"beside the table's row for the same spec `{spec.hash}`:\n\n| metric | live | table |\n"
        f"|---|---|---|\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    where = [args.resume or args.run_dir or "runs/<the new run>"]

    def body() -> int:
        cfg, run_dir = resolve_run(args)
        where[0] = run_dir
        policy = train(cfg, run_dir, resume=args.resume is not None, report=not args.no_report)
        report = RunFolder(run_dir).report
        print(f"policy: {policy}" + (f"\nreport: {report}" if report.is_file() else ""))
        return 0

    code = run_main(body, interrupted="")
    if code == 130:
        print(
            f"every finished evaluation is stored and the last rollout checkpointed in {where[0]}; "
            f"continue with python -m memrl.train_agent --resume {where[0]}",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
