"""Nearest-neighbour search: FAISS flat / IVF / HNSW vs torch brute force, side by side.

512 queries against 10k, 100k and 1M L2-normalised training embeddings at dims 128 and 512;
prints the search time (index build excluded, reported apart), the ratio to torch brute force,
and the recall@1 of the approximate indexes.

    python bench/bench_nn_search.py [--sizes 10000 100000 1000000] [--dims 128 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from memrl.metrics.memorization import NearestNeighbourIndex


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--queries", type=int, default=512)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.queries} queries, k=1")
    print(
        "| N | dim | index | build s | search s | ratio to torch | recall@1 |\n|---|---|---|---|---|---|---|"
    )
    g = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for dim in args.dims:
            if n * dim * 4 > 3e9:
                continue
            train = torch.randn(n, dim, generator=g)
            queries = train[torch.randint(0, n, (args.queries,), generator=g)] + 0.5 * torch.randn(
                args.queries, dim, generator=g
            )
            results = {}
            for name, backend, kind in (
                ("torch", "torch", "flat"),
                ("faiss flat", "faiss", "flat"),
                ("faiss ivf", "faiss", "ivf"),
                ("faiss hnsw", "faiss", "hnsw"),
            ):
                if kind == "hnsw" and n > 100_000:
                    continue  # HNSW construction of 1M points takes minutes on 2 cores
                start = time.perf_counter()
                index = NearestNeighbourIndex(train, backend, kind, nprobe=8)
                build = time.perf_counter() - start
                search = timed(lambda index=index, q=queries: index.search(q, 1))
                _, idx = index.search(queries, 1)
                results[name] = (build, search, idx)
            ref_time, ref_idx = results["torch"][1], results["torch"][2]
            for name, (build, search, idx) in results.items():
                recall = float((idx[:, 0] == ref_idx[:, 0]).float().mean())
                print(
                    f"| {n:,} | {dim} | {name} | {build:.2f} | {search:.4f} | {search / ref_time:.2f} | "
                    f"{recall:.3f} |",
                    flush=True,
                )
            del train


if __name__ == "__main__":
    main()
