"""What one fold of ``python -m research.benchmark transfer`` costs, and a digest of its rows.

One fold: the held-out tasks' training set (every training task), seed 0, the one-shot PPO
policies (10,000 episodes, with and without the descriptor), the untrained search policy and its
ablations, the Optuna searches and the zero-shot rules, scored on the first held-out task. Run it
at two commits to compare (the digest must match: a speed-up may not change a result); with
``--profile`` it prints where the time goes.

    OMP_NUM_THREADS=1 python bench/bench_transfer_fold.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: research/ is not installed

from memrl.config import load_config  # noqa: E402
from research.benchmark.experiments import BUDGETS, transfer_fold  # noqa: E402
from research.benchmark.folds import load_table, split_folds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true", help="print the 30 costliest calls")
    args = parser.parse_args()
    cfg = load_config("bench")
    start = time.perf_counter()
    table = load_table(cfg)
    loaded = time.perf_counter() - start
    test, train, split = next(f for f in split_folds(table) if table.heldout[f[0]])
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    rows = transfer_fold(cfg, table, 0, [(test, split)], train, 10_000, BUDGETS, 0)
    if profile:
        profile.disable()
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    print(
        f"load_table {loaded:.1f} s; fold ({table.names[test]} against {len(train)} training tasks) "
        f"{seconds:.1f} s, {len(rows)} rows, digest {digest}"
    )
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
