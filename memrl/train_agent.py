"""Train a PPO agent on MemControl-v0.

    python -m memrl.train_agent                                   # embedded default, CPU, minutes
    python -m memrl.train_agent --config configs/my.yaml --set ppo.total_timesteps=256 env.mode=sequential
    python -m memrl.train_agent --resume runs/20261127-221500-ab12cd34

The run directory holds the resolved config, seed and package versions, the evaluation store,
TensorBoard logs (``tb/``), checkpoints, ``episodes.jsonl``, and at the end ``policy.zip`` with
its card ``policy.card.json`` and a report (``report.md`` + plots).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from memrl.config import Config, ConfigError, dump_config, load_config, parse_overrides
from memrl.data import DataError
from memrl.utils import atomic_write_text, package_versions, setup_logging

log = logging.getLogger("memrl.train_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.train_agent",
        description="Train a PPO agent that chooses which UNet modules to fine-tune (MemControl-v0).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--config", default="default", help="a shipped config name (default, test) or a YAML path"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. ppo.n_steps=32 env.mode=sequential finetune.steps=40",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of PPO, tasks and fine-tunes")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where results go (default: runs/<time>-<hash>)"
    )
    parser.add_argument(
        "--resume", type=Path, default=None, help="continue the run in this directory from its checkpoint"
    )
    parser.add_argument(
        "--timesteps", type=int, default=None, help="total env steps (= evaluations); ppo.total_timesteps"
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return parser.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run directory: fresh from the arguments, or read back for ``--resume``."""
    if args.resume is not None:
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: no config.yaml here; --resume takes a run directory")
        cfg = load_config(run_dir / "config.yaml", args.set)
        return cfg, run_dir
    overrides = parse_overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.timesteps is not None:
        overrides["ppo.total_timesteps"] = args.timesteps
    cfg = load_config(args.config, overrides)
    if cfg.env.store is None:
        cfg.env.store = "evaluations.sqlite"  # resolved inside the run directory below
    run_dir = args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.hash()[:8]}"
    return cfg, run_dir


def record_run(cfg: Config, run_dir: Path) -> None:
    """Seed, config, versions and dataset fingerprints beside the results."""
    from memrl.evaluate import TaskContext

    dump_config(cfg, run_dir / "config.yaml")
    tasks = [dict(t) for t in cfg.env.tasks] or [{}]
    fingerprints = []
    for task in tasks:
        task_cfg = load_config(cfg, {f"data.{k}": v for k, v in task.items()})
        fingerprints.append({"task": task, **TaskContext.get(task_cfg).fingerprints})
    meta = {
        "seed": cfg.seed,
        "config_hash": cfg.hash(),
        "versions": package_versions(),
        "tasks": fingerprints,
    }
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=2))


def train(cfg: Config, run_dir: Path, resume: bool = False, report: bool = True) -> Path:
    """Build env and PPO, learn, save policy + card, write the report. Returns the policy path."""
    from stable_baselines3 import PPO

    from memrl.agents.policy import write_card
    from memrl.agents.ppo import CHECKPOINT, AtomicCheckpoint, EvaluationLogger, build_ppo, make_env
    from memrl.envs.memcontrol import MemControlEnv

    run_dir.mkdir(parents=True, exist_ok=True)
    record_run(cfg, run_dir)  # a relative env.store stays relative: it lives inside the run directory
    cfg = load_config(cfg, {"env.store": str((run_dir / (cfg.env.store or "evaluations.sqlite")).resolve())})
    env = make_env(cfg, cfg.ppo.n_envs, cfg.seed)
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        model = PPO.load(checkpoint, env=env, device="cpu")
        log.info("resumed from %s at %d timesteps", checkpoint, model.num_timesteps)
    else:
        model = build_ppo(cfg, env, run_dir)
    remaining = cfg.ppo.total_timesteps - model.num_timesteps
    if remaining > 0:
        callbacks = [EvaluationLogger(run_dir), AtomicCheckpoint(run_dir)]
        model.learn(
            remaining,
            callback=callbacks,
            progress_bar=True,
            reset_num_timesteps=not resume,
            tb_log_name="ppo",
        )
        callbacks[1].save()
    policy_path = run_dir / "policy.zip"
    model.save(policy_path)
    first_env = env.envs[0].unwrapped if hasattr(env, "envs") else MemControlEnv(cfg)
    write_card(policy_path, first_env, cfg, {"num_timesteps": int(model.num_timesteps)})
    env.close()
    if report:
        from memrl.agents.policy import load_policy
        from memrl.report import write_report

        # Evaluate the trained policy's own mask on the first task, so the report can show it.
        first_env.reset(options={"dataset": 0})
        chosen = load_policy(policy_path).candidates(first_env.dataset_descriptor, 1)[0]
        first_env.evaluate_mask(chosen)
        write_report(run_dir, chosen=[int(v) for v in chosen])
    return policy_path


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_run(args)
        policy = train(cfg, run_dir, resume=args.resume is not None, report=not args.no_report)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"policy: {policy}\nreport: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
