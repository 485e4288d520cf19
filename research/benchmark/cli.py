"""Is a learned policy worth reusing? Zero-shot transfer on the MemControl-Bench tables.

For each test task (leave-one-task-out over the training tasks; leave-one-source-out, each training
task against the training tasks of other sources only, as a new kind of data meets the tables; and
each held-out task, of a source no training task uses), each preference and each seed, every
method picks masks for the test task without having seen it; its regret is read off the table,
normalised per task and preference: 0 = the task's best mask, 1 = its worst. (Not 1 = the mask
of ones: on tasks where fine-tuning induces little memorization the mask of ones is the best mask
or close to it, and a regret scaled by it is undefined or explodes.)
Methods (every one zero-shot from the training tasks' rows and the test task's descriptor, or
searching the test task; judged at 1..4 or 1..16 fine-tunes):

* ``ppo`` (its 1..4 most probable masks) and ``ppo-no-descriptor``: the one-shot PPO policy;
* ``ppo-search`` and its ablations ``-no-descriptor`` / ``-no-history``: the search policy
  (``env.mode=search``), each fine-tune chosen after the results before it;
* ``nearest-task``, ``knn-tasks``, ``portfolio``, ``regression``, ``gradient-top-g``,
  ``single-best`` (by mean regret), ``single-best (mean reward)``, ``preset: ...``;
* ``random``, ``tpe``, ``gp``, ``tpe-warm`` (TPE with the nearest task's best masks first) and
  ``gp-prior`` (a GP whose prior mean is the calibrated regret of the training tasks weighted by
  descriptor distance, :meth:`memrl.prior.TransferPrior.weighted_sources`; no learning).

    python -m research.benchmark transfer --n-seeds 10   # --episodes (one-shot PPO), --search-episodes
    python -m research.benchmark tune --n-seeds 2      # --method ppo-search|ppo|regression, --nested
    python -m research.benchmark tune --method controller --config bench3 --n-seeds 2   # curve suites
    python -m research.benchmark modes --n-seeds 3
    python -m research.benchmark claims
    python -m research.benchmark findings              # best masks per task, seed noise (no method runs)
    python -m research.benchmark search --n-seeds 10 --budget 64
    python -m research.benchmark recipes --config bench3 --episodes 50000   # curve suites: rules, controller
    python -m research.benchmark live --config bench3 --policy A.zip B.zip --tasks animals faces

``transfer`` writes ``transfer.csv`` (one row per method, task, split, preference, seed and number
of fine-tunes), ``transfer.md`` (per split and preference: mean with a task-level 95% interval, IQM,
tail, worst, hits, paired difference to ``ppo``, gap closed; then mean regret by fine-tunes) and
``transfer.png``.
``tune`` chooses a method's learning rate and length (training episodes for the search policy,
where 0 is untrained and searches exactly as ``gp-prior``, and for one-shot PPO; boosting
iterations for the regression) by leaving one *training* task out, so no held-out task is looked
at (``tune-METHOD.csv``, ``tune-METHOD.md``); the chosen values go in ``configs/bench.yaml``'s
``ppo`` (the PPO policies) and ``research.benchmark.methods`` (the regression). The leave-one-out
split of ``transfer`` then scores methods tuned on its own test tasks (optimistic); ``--nested``
adds the honest figure: each left-out task's setting chosen on inner folds without it.
``tune --method controller`` chooses the controller's PPO entropy coefficient on a curve suite by
leaving one *training* source out (``tune-controller.*``; the choice goes in the suite's ``ppo``).
``modes`` compares mask mode with sequential mode (one group per step): the zero-shot regret of
each one's first proposal after the same numbers of training episodes (``modes.*``).
``claims`` checks the MemControl paper's findings at small scale (``claims.*``): full fine-tuning
memorizes more than the attention presets; memorization grows with duplication; searched masks
against the presets on the Pareto front.
``search`` is the other question: searching one task from scratch, best-so-far regret against
the number of distinct fine-tunes (1..64) for PPO, random search, TPE, NSGA-II and GP
(``search.csv``, ``search.md``, ``search.png``).
``recipes`` judges fixed recipes, stopping rules and a controller trained by replay on a curve
suite (:mod:`~research.benchmark.recipes`); ``live`` judges controllers by real fine-tunes of named
tasks, those that change groups mid-run included (:mod:`~research.benchmark.live`).

The package: :mod:`~research.benchmark.folds` (the tables as arrays, folds),
:mod:`~research.benchmark.methods` (what each method tries), :mod:`~research.benchmark.experiments`
(transfer, modes, search), :mod:`~research.benchmark.stats` (IQM, bootstrap, tables, plots),
:mod:`~research.benchmark.findings` (findings and the paper's claims), :mod:`~research.benchmark.ship`
(the shipped policy, released with ``python -m research.release``) and :mod:`~research.benchmark.cli`
(the command).

The ``python -m research.benchmark`` command (its help is :mod:`research.benchmark`'s docstring).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from memrl.envs.control import control_metrics

from memrl.config import Config
from memrl.curves import load_curves
from memrl.errors import ConfigError
from research.benchmark.experiments import (
    RESULTS_VERSION,
    TUNE_GRIDS,
    chosen_setting,
    leave_one_out,
    modes,
    nested_rows,
    nested_settings,
    search_curves,
    setting_of,
    transfer,
    tune,
)
from research.benchmark.findings import claims, findings
from research.benchmark.folds import load_table
from research.benchmark.live import live_report, live_rows
from research.benchmark.recipes import (
    CONTROLLER_SPLITS,
    controller_rows,
    recipe_rows,
    recipes_report,
    table_descriptors,
    tune_controller,
    tuning_lines,
)
from research.benchmark.stats import (
    plot_curves,
    plot_transfer,
    summarise,
    summarise_nested,
    summarise_tuning,
    write_rows,
)

__all__ = ["REPORTS", "main", "run_record", "tuning_report"]


def _controller_parts(args: argparse.Namespace) -> Path:
    """Where controller runs keep their rows (``--parts``, else one cache folder for ``recipes`` and
    ``tune --method controller``: their keys agree, so a run of one resumes the other's)."""
    from memrl.utils import cache_dir

    return args.parts or cache_dir() / "benchmark" / "recipes"


def _recipes(cfg: Config, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The rules on a curve suite (``--config bench3``), and with ``--episodes N`` a controller
    trained for N PPO steps per fold and seed, with its ablations."""
    table = load_curves(cfg, control_metrics(cfg))
    rows = recipe_rows(table, cfg.reward, table_descriptors(cfg, table))
    if args.episodes:
        splits = tuple(s.strip() for s in args.control_splits.split(","))
        parts = _controller_parts(args)
        seeds = tuple(range(args.n_seeds))
        rows += controller_rows(cfg, table, args.episodes, seeds, splits, args.workers, parts)
    return rows, recipes_report(rows, table, cfg.reward)


def _tune_controller(cfg: Config, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """``tune --method controller``: the controller's entropy coefficient, leave one training
    source out on a curve suite (:func:`research.benchmark.recipes.tune_controller`)."""
    table = load_curves(cfg, control_metrics(cfg))
    timesteps = args.episodes or cfg.ppo.total_timesteps
    rows = tune_controller(cfg, table, timesteps, args.n_seeds, args.workers, _controller_parts(args))
    return rows, tuning_lines(rows)


def _live(cfg: Config, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Controllers' guarded fine-tunes of named tasks, live (``--policy``, ``--tasks``)."""
    if not args.policy or not args.tasks:
        raise ConfigError(
            "live needs --policy (one or more controllers) and --tasks (tasks with complete curves)"
        )
    rows = live_rows(cfg, args.policy, args.tasks)
    return rows, live_report(rows)


REPORTS: dict[str, Any] = {
    "findings": lambda cfg, args: ([], findings(cfg)),
    "claims": lambda cfg, args: claims(cfg, args.out / "claims.png"),
    "recipes": _recipes,
    "live": _live,
}
"""Commands that read the tables and run no fold cache: (config, arguments) -> (rows, Markdown)."""


def main(argv: list[str] | None = None) -> int:
    from memrl.cli import add_config_args, config_from_args, run_main
    from memrl.utils import atomic_write_text, cache_dir, setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m research.benchmark",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "command",
        choices=("transfer", "tune", "search", "modes", "claims", "findings", "recipes", "live"),
        nargs="?",
        default="transfer",
    )
    add_config_args(parser, seed=False)
    parser.set_defaults(config="bench")
    parser.add_argument(
        "--n-seeds", type=int, default=10, help="how many seeds each method runs (seeds 0..N-1)"
    )
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="transfer: training episodes of the one-shot PPO policy (default 10,000); recipes: PPO steps "
        "of the controller per fold (default: the rules only)",
    )
    parser.add_argument("--budget", type=int, default=64, help="search: distinct fine-tunes per search")
    parser.add_argument(
        "--control-splits",
        default=",".join(CONTROLLER_SPLITS),
        help="recipes: the splits a controller is trained and judged on, comma-separated (one PPO run per "
        "fold's training set; 'leave one task out' trains one per training task)",
    )
    parser.add_argument("--policy", type=Path, nargs="+", help="live: the controllers to judge")
    parser.add_argument("--tasks", nargs="+", help="live: the tasks they fine-tune (complete curves)")
    parser.add_argument(
        "--search-episodes",
        type=int,
        default=None,
        help="transfer: training episodes of the search policy, env.budget masks each (default: "
        "ppo.total_timesteps / env.budget, the shipped policy's recipe; 0: untrained)",
    )
    parser.add_argument(
        "--method",
        choices=(*TUNE_GRIDS, "controller"),
        default="ppo-search",
        help="tune: whose settings (the search policy, the one-shot PPO policy, the regression; the "
        "controller's entropy coefficient on a curve suite, --episodes PPO steps per fold)",
    )
    parser.add_argument(
        "--nested",
        action="store_true",
        help="tune: also choose each left-out task's setting without it (fits that leave out every "
        "pair of training tasks: about 3x the work with 7 tasks)",
    )
    parser.add_argument(
        "--no-search-policy", action="store_true", help="transfer: leave the search policy out"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/benchmark"), help="results folder")
    parser.add_argument(
        "--workers", type=int, default=2, help="single-threaded processes side by side (2 cores: 2)"
    )
    parser.add_argument(
        "--parts",
        type=Path,
        default=None,
        help="where each finished fold is kept, so a rerun resumes (default: "
        "$MEMRL_CACHE/benchmark/COMMAND; name a folder that outlives the machine for a long run)",
    )
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> int:
        start = time.perf_counter()
        for flag, value in (
            ("--n-seeds", args.n_seeds),
            ("--episodes", args.episodes),
            ("--budget", args.budget),
            ("--workers", args.workers),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag}={value} must be 1 or more")
        if args.search_episodes is not None and args.search_episodes < 0:
            raise ConfigError(f"--search-episodes={args.search_episodes} must be 0 (untrained) or more")
        cfg = config_from_args(args)
        args.out.mkdir(parents=True, exist_ok=True)
        parts = args.parts or cache_dir() / "benchmark" / args.command  # a rerun resumes from these
        name = args.command  # of the files written to --out
        if args.command == "transfer":
            rows = transfer(
                cfg,
                args.n_seeds,
                10_000 if args.episodes is None else args.episodes,
                workers=args.workers,
                parts=parts,
                search_episodes=(
                    None
                    if args.no_search_policy
                    else cfg.ppo.total_timesteps // cfg.env.budget
                    if args.search_episodes is None
                    else args.search_episodes
                ),
            )
            text = summarise(rows)
            plot_transfer(rows, args.out / "transfer.png")
        elif args.command == "tune" and args.method == "controller":
            rows, text = _tune_controller(cfg, args)
            name = "tune-controller"
        elif args.command == "tune":
            rows = tune(cfg, args.n_seeds, args.method, workers=args.workers, parts=parts, nested=args.nested)
            text = tuning_report(rows, args.nested)
            name = f"tune-{args.method}"
        elif args.command in REPORTS:
            rows, text = REPORTS[args.command](cfg, args)
        elif args.command == "modes":
            rows = modes(cfg, args.n_seeds, workers=args.workers, parts=parts)
            text = plot_curves(rows, args.out / "modes.png", "episodes", "training episodes")
        else:
            rows = search_curves(cfg, args.n_seeds, args.budget, workers=args.workers, parts=parts)
            text = plot_curves(rows, args.out / "search.png")
        if rows:
            write_rows(rows, args.out / f"{name}.csv")
        seeded = args.command in ("transfer", "tune", "search", "modes")
        seconds = time.perf_counter() - start
        seeds = f"{args.n_seeds} seeds; " if seeded else ""
        footer = f"\n\n{seeds}{seconds:.0f} s\n"
        atomic_write_text(args.out / f"{name}.md", text + footer)
        command = sys.argv[1:] if argv is None else argv
        record = run_record(cfg, command, args.n_seeds if seeded else 0, seconds)
        atomic_write_text(args.out / f"{name}.json", json.dumps(record, indent=2))
        print(text)
        return 0

    return run_main(body)


def run_record(cfg: Config, argv: list[str], seeds: int, seconds: float) -> dict[str, Any]:
    """What a result depends on, written beside it as ``NAME.json``: the command, its seeds, the
    config and its hash, the table's fingerprint (every task's stored terms, noise sample and
    descriptor), the digest of the code behind the rows and the package versions."""
    from memrl.utils import package_versions

    table = load_table(cfg)
    return {
        "command": " ".join(["python -m research.benchmark", *argv]),
        "seeds": list(range(seeds)),
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "table": {"tasks": table.names, "digest": table.digest(list(range(len(table.names))))},
        "results_version": RESULTS_VERSION,
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(seconds, 1),
    }


def tuning_report(rows: list[dict[str, Any]], nested: bool) -> str:
    """``tune``'s markdown: every setting leave one task out with the chosen one marked, and with
    ``nested`` each fold's own choice and the honest mean beside the optimistic one."""
    flat = leave_one_out(rows)
    chosen = chosen_setting(flat)
    text = summarise_tuning(flat, chosen) + f"\n\nChosen: learning rate {chosen[0]:g}, length {chosen[1]}."
    if nested:
        same = [r for r in flat if setting_of(r) == chosen]
        text += "\n\n" + summarise_nested(nested_rows(rows), nested_settings(rows), same)
    return text
