"""What a step of table replay costs against a live step, measured in one run.

Replay: ``gym.make("MemControl-v0", config="bench")`` stepping (task, mask) pairs that the
shipped table holds. Live: the same env with ``env.backend=inprocess``, one mask the table does
not hold yet (the references come from the table, so this is the cost of one fine-tune + scoring).

    python bench/bench_replay.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import numpy as np

import memrl  # noqa: F401
from memrl.store import EvaluationStore
from memrl.tables import table_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    env = gym.make("MemControl-v0", config="bench").unwrapped
    held = EvaluationStore(table_path("bench"), readonly=True).hashes()
    pairs, missing = [], None
    for i, task in enumerate(env.tasks):
        for bits in range(2**env.k):
            mask = np.array([(bits >> j) & 1 for j in range(env.k)], dtype=np.int8)
            if task.context.spec(mask).hash in held:
                pairs.append((i, mask))
            elif missing is None:
                missing = (i, mask)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for n in range(args.steps):
        i, mask = pairs[rng.integers(len(pairs))]
        env.reset(seed=n, options={"dataset": i})
        env.step(mask)
    replay = (time.perf_counter() - start) / args.steps
    print(
        f"replay: {len(pairs)} stored (task, mask) pairs; {replay * 1e3:.2f} ms per reset+step "
        f"({1 / replay:.0f} steps/s)"
    )
    if missing is None:
        print("the table is complete: no mask left to time a live step on")
        return
    with tempfile.TemporaryDirectory() as tmp:
        live = gym.make(
            "MemControl-v0",
            config="bench",
            overrides={"env.backend": "inprocess", "env.store": f"{tmp}/s.sqlite"},
        ).unwrapped
        live.reset(seed=0, options={"dataset": missing[0]})
        start = time.perf_counter()
        live.step(missing[1])
        seconds = time.perf_counter() - start
    print(
        f"live: one uncached step ({live.tasks[missing[0]].name}, mask {''.join(map(str, missing[1]))}) "
        f"{seconds:.1f} s; replay is {seconds / replay:,.0f}x faster"
    )


if __name__ == "__main__":
    main()
