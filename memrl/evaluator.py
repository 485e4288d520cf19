"""Where evaluations are looked up and run: one place that wires them.

* :class:`Evaluator`: a spec is looked up in the shipped tables (read-only) and the evaluation
  store, and a miss runs on a backend (:mod:`memrl.backends`: in this process, a subprocess per
  evaluation, Ray tasks) or, for a table build, on a pool of single-threaded worker processes
  (:meth:`Evaluator.stream`); only this process writes the store.
* :func:`make_evaluator`: the Evaluator of a config's ``env`` section (its store, shipped table,
  backend and replay fallback), the one constructor every command and the env use.
* :func:`table_path`: a shipped table's file by name, or a table file.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from memrl.backends import BACKENDS, run_inprocess, run_ray, run_subprocess
from memrl.config import Config
from memrl.errors import NotInStoreError, StoreError
from memrl.runs import STORE_FILE
from memrl.spec import EvalSpec, Evaluation
from memrl.store import EvaluationStore

__all__ = ["Evaluator", "SHIPPED", "command_store", "make_evaluator", "shipped_dir", "table_path"]

log = logging.getLogger(__name__)

SHIPPED = ("bench", "bench3")
"""The tables that ship with memrl (``memrl/assets/tables/<name>.sqlite``)."""


def shipped_dir() -> Path:
    return Path(str(resources.files("memrl") / "assets" / "tables"))


def command_store(cfg: Config, folder: Path) -> Path:
    """Where a command that writes a folder (a run, a search) keeps its evaluations:
    ``env.store`` when absolute, a relative ``env.store`` inside ``folder``, else
    ``folder/evaluations.sqlite``. The one rule ``train_agent``, ``search`` and ``report`` share."""
    store = Path(cfg.env.store or STORE_FILE)
    return store if store.is_absolute() else (Path(folder) / store).resolve()


def table_path(name: str) -> Path:
    """A shipped table's file (``bench``) or a path to a table file."""
    if name in SHIPPED:
        path = shipped_dir() / f"{name}.sqlite"
        if not path.is_file():
            raise StoreError(f"the shipped table {name!r} is missing ({path}); reinstall memrl or build it")
        return path
    path = Path(name)
    if not path.is_file():
        raise StoreError(f"env.table={name!r} is neither a shipped table ({', '.join(SHIPPED)}) nor a file")
    return path


class Evaluator:
    """Cached evaluation of specs.

    Args:
        store: where results are kept (a repeated spec costs nothing).
        backend: ``inprocess``, ``subprocess`` or ``replay``.
        fallback: for ``replay``, the live backend for specs found nowhere (None: raise).
        tables: read-only stores consulted first (the shipped MemControl-Bench tables).
    """

    def __init__(
        self,
        store: EvaluationStore,
        backend: str = "inprocess",
        fallback: str | None = None,
        tables: list[EvaluationStore] | None = None,
        ray: Any = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.store, self.backend, self.fallback, self.ray = store, backend, fallback, ray
        self.tables = list(tables or [])
        self.hits = self.misses = 0
        self._memo: dict[str, Evaluation] = {}

    def lookup(self, spec_hash: str) -> Evaluation | None:
        """A stored evaluation (tables first, then the store), or None; a copy marked as a cache hit
        (the object an earlier caller holds is never changed)."""
        return self.lookup_many([spec_hash])[0]

    def lookup_many(self, spec_hashes: Sequence[str]) -> list[Evaluation | None]:
        """:meth:`lookup` of each of ``spec_hashes``, one query per source for all of them."""
        todo = [h for h in dict.fromkeys(spec_hashes) if h not in self._memo]
        for source in (*self.tables, self.store):
            if not todo:
                break
            found = source.get_many(todo)
            self._memo.update(found)  # stored rows are final
            todo = [h for h in todo if h not in found]
        return [
            dataclasses.replace(self._memo[h], cache_hit=True) if h in self._memo else None
            for h in spec_hashes
        ]

    def evaluate(self, spec: EvalSpec) -> Evaluation:
        return self.evaluate_many([spec])[0]

    def evaluate_many(self, specs: list[EvalSpec]) -> list[Evaluation]:
        """Evaluations of ``specs``: stored ones looked up, the others run (concurrently on Ray)."""
        found: dict[str, Evaluation] = {}
        misses: dict[str, EvalSpec] = {}
        for spec, hit in zip(specs, self.lookup_many([s.hash for s in specs])):
            if hit is not None:
                self.hits += 1
                found[spec.hash] = hit
            else:
                misses.setdefault(spec.hash, spec)
        if misses:
            backend = self._live_backend(next(iter(misses.values())))
            todo = list(misses.values())
            if backend == "ray":
                results = run_ray(todo, self.ray)
            else:
                results = [run_subprocess(s) if backend == "subprocess" else run_inprocess(s) for s in todo]
            for spec, result in zip(todo, results):
                self.misses += 1
                self.store.put(result, spec)
                self._memo[spec.hash] = result
                found[spec.hash] = result
        return [found[s.hash] for s in specs]

    def stream(
        self, specs: list[EvalSpec], workers: int, threads: int = 1, backend: str = "pool"
    ) -> Iterator[Evaluation]:
        """Evaluate ``specs`` (none looked up: the caller passes what is missing), storing each
        result as it arrives and yielding it, in completion order: on ``workers`` spawned worker
        processes with ``threads`` torch threads each (``pool``, recycled every 64 evaluations), or
        as Ray tasks ``workers`` at a time (``ray``). A table build runs on this."""
        by_hash = {s.hash: s for s in specs}
        pool = None
        results: Iterator[Evaluation]
        if backend == "ray":
            chunks = [specs[i : i + workers] for i in range(0, len(specs), workers)]
            results = (ev for chunk in chunks for ev in run_ray(chunk, self.ray))
        else:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
            pool = mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(threads,), maxtasksperchild=64
            )
            texts = pool.imap_unordered(_work, [s.to_json() for s in specs])
            results = (Evaluation.from_json(text) for text in texts)
        try:
            for ev in results:
                self.store.put(ev, by_hash[ev.spec_hash])
                self._memo[ev.spec_hash] = ev
                yield ev
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    def _live_backend(self, spec: EvalSpec) -> str:
        if self.backend != "replay":
            return self.backend
        if self.fallback is None:
            where = ", ".join(str(s.path) for s in (*self.tables, self.store))
            raise NotInStoreError(
                f"mask {''.join(map(str, spec.mask))} (spec {spec.hash}) is in none of {where}; "
                "evaluate it with a live backend, or set env.replay_fallback=true"
            )
        return self.fallback

    def descriptor(self, key: str) -> np.ndarray | None:
        for source in (*self.tables, self.store):
            found = source.descriptor(key)
            if found is not None:
                return found
        return None

    def put_descriptor(self, key: str, task: dict[str, Any], value: np.ndarray) -> None:
        if not self.store.readonly:
            self.store.put_descriptor(key, task, value)


def _work(spec_json: str) -> str:
    """A pool worker's evaluation (JSON in, JSON out)."""
    return run_inprocess(EvalSpec.from_json(spec_json)).to_json()


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)


def make_evaluator(cfg: Config) -> Evaluator:
    """The Evaluator of ``cfg.env``: its store, shipped table, backend and replay fallback."""
    e = cfg.env
    tables = [EvaluationStore(table_path(e.table), readonly=True)] if e.table else []
    fallback = "inprocess" if e.backend == "replay" and e.replay_fallback else None
    return Evaluator(EvaluationStore(e.store), e.backend, fallback=fallback, tables=tables, ray=cfg.ray)
