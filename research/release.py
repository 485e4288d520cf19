"""Release a policy that ships with memrl: train it by replay on every complete training task of
the suite and put the benchmark's numbers on its card (:func:`research.benchmark.ship.ship`).

    python -m research.release --config bench --results bench/results/benchmark   # the search policy
    python -m research.release --config bench3 --set env.mode=control env.backend=replay \
        --results bench/results/benchmark                                         # the controller
    python -m research.release --to /tmp/candidate      # anywhere but the package, to look first

A release step of the project, run from a checkout; nothing in the installed package calls it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memrl.agents.policy import shipped_controller, shipped_policy

from memrl.cli import add_config_args, config_from_args, run_main
from memrl.utils import setup_logging
from research.benchmark.ship import ship

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.release",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_args(parser, seed=False)
    parser.set_defaults(config="bench")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("bench/results/benchmark"),
        help="the benchmark's results, whose numbers go on the card (transfer.csv for a search "
        "policy, recipes.csv for a controller)",
    )
    parser.add_argument(
        "--to",
        type=Path,
        default=None,
        help="where the policy goes (default: the package's search policy or controller)",
    )
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> int:
        cfg = config_from_args(args)
        shipped = shipped_controller() if cfg.env.mode == "control" else shipped_policy()
        path = ship(cfg, args.to or shipped.parent, args.results)
        print(f"policy: {path}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
