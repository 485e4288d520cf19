"""Where evaluations run, and the cache in front of them.

:class:`Evaluator` looks a spec up in a shipped table (read-only) and in the evaluation store,
and runs a miss on a backend:

* ``inprocess``: in this process (fast; a crash takes the caller down).
* ``subprocess``: a fresh worker process per evaluation (memory is returned; a segfault or OOM
  becomes a recorded failure).
* ``replay``: tables and store only; an unknown spec raises :class:`~memrl.errors.NotInStoreError`
  unless a ``fallback`` backend is given.

``python -m memrl.backends SPEC.json OUT.json`` is the subprocess worker.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from memrl.errors import MemrlError, NotInStoreError, SpecError
from memrl.spec import EvalSpec, Evaluation
from memrl.store import EvaluationStore
from memrl.utils import package_versions

log = logging.getLogger(__name__)

BACKENDS = ("inprocess", "subprocess", "replay")
_SPEC_ERROR_EXIT = 3


def failure(spec: EvalSpec, reason: str) -> Evaluation:
    """A recorded failure of ``spec`` (stored like a result, so it is not retried)."""
    return Evaluation(spec.hash, spec.mask, {}, ok=False, error=reason, versions=package_versions())


def run_inprocess(spec: EvalSpec) -> Evaluation:
    """Evaluate here; a failure of the evaluation (divergence, bad data, OOM) is recorded."""
    from memrl.scoring import evaluate_spec

    try:
        return evaluate_spec(spec)
    except SpecError:
        raise
    except (FloatingPointError, RuntimeError, ValueError, MemoryError) as exc:
        log.warning("evaluation %s failed: %s", spec.hash, exc)
        return failure(spec, f"{type(exc).__name__}: {exc}")


def run_subprocess(spec: EvalSpec) -> Evaluation:
    """Evaluate in a fresh worker process; a crash of the worker is a recorded failure."""
    with tempfile.TemporaryDirectory(prefix="memrl-eval-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "evaluation.json"
        spec_path.write_text(spec.to_json())
        cmd = [sys.executable, "-m", "memrl.backends", str(spec_path), str(out_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == _SPEC_ERROR_EXIT:
            raise SpecError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return failure(spec, f"worker exited with code {proc.returncode}: {' | '.join(tail)}")
        return Evaluation.from_json(out_path.read_text())


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
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.store, self.backend, self.fallback = store, backend, fallback
        self.tables = list(tables or [])
        self.hits = self.misses = 0
        self._memo: dict[str, Evaluation] = {}

    def lookup(self, spec_hash: str) -> Evaluation | None:
        """A stored evaluation (tables first, then the store), or None."""
        if spec_hash in self._memo:
            return self._memo[spec_hash]
        for source in (*self.tables, self.store):
            found = source.get(spec_hash)
            if found is not None:
                found.cache_hit = True
                self._memo[spec_hash] = found  # stored rows are final
                return found
        return None

    def evaluate(self, spec: EvalSpec) -> Evaluation:
        found = self.lookup(spec.hash)
        if found is not None:
            self.hits += 1
            return found
        backend = self.backend
        if backend == "replay":
            if self.fallback is None:
                where = ", ".join(str(s.path) for s in (*self.tables, self.store))
                raise NotInStoreError(
                    f"mask {''.join(map(str, spec.mask))} (spec {spec.hash}) is in none of {where}; "
                    "evaluate it with a live backend, or set env.replay_fallback=true"
                )
            backend = self.fallback
        self.misses += 1
        result = run_subprocess(spec) if backend == "subprocess" else run_inprocess(spec)
        self.store.put(result, spec)
        return result

    def descriptor(self, key: str) -> np.ndarray | None:
        for source in (*self.tables, self.store):
            found = source.descriptor(key)
            if found is not None:
                return found
        return None

    def put_descriptor(self, key: str, task: dict[str, Any], value: np.ndarray) -> None:
        if not self.store.readonly:
            self.store.put_descriptor(key, task, value)


def _worker(argv: list[str]) -> int:
    from memrl.scoring import evaluate_spec

    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = EvalSpec.from_json(spec_path.read_text())
    try:
        result = evaluate_spec(spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return _SPEC_ERROR_EXIT
    except (Exception, MemrlError) as exc:  # the worker reports every failure to its parent
        traceback.print_exc()
        result = failure(spec, f"{type(exc).__name__}: {exc}")
    out_path.write_text(result.to_json())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_worker(sys.argv[1:]))
