"""Where evaluations run, and the cache in front of them.

:class:`Evaluator` looks a spec up in a shipped table (read-only) and in the evaluation store,
and runs a miss on a backend:

* ``inprocess``: in this process (fast; a crash takes the caller down).
* ``subprocess``: a fresh worker process per evaluation (memory is returned; a segfault or OOM
  becomes a recorded failure).
* ``ray``: each evaluation a Ray task (``ray.*``: cluster address, CPUs and fractional GPUs per
  evaluation) in a fresh worker (``max_calls=1``), retried once if its worker dies, then recorded
  as a failure; :meth:`Evaluator.evaluate_many` runs misses concurrently. Only the driver writes
  the store.
* ``replay``: tables and store only; an unknown spec raises :class:`~memrl.errors.NotInStoreError`
  unless a ``fallback`` backend is given.

``python -m memrl.backends SPEC.json OUT.json`` is the subprocess worker.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from memrl.errors import ConfigError, MemrlError, SpecError
from memrl.registry import BACKENDS  # noqa: F401  (re-exported)
from memrl.spec import EvalSpec, Evaluation
from memrl.utils import package_versions

__all__ = [
    "RAY_CONNECT_TIMEOUT",
    "check_reachable",
    "ensure_ray",
    "failure",
    "run_inprocess",
    "run_ray",
    "run_subprocess",
]

log = logging.getLogger(__name__)

_SPEC_ERROR_EXIT = 3


def failure(spec: EvalSpec, reason: str) -> Evaluation:
    """A recorded failure of ``spec`` (stored like a result, so it is not retried)."""
    return Evaluation(spec.hash, spec.mask, {}, ok=False, error=reason, versions=package_versions())


def run_inprocess(spec: EvalSpec) -> Evaluation:
    """Evaluate here. A failure of the run (divergence, out of memory) is recorded as a failed
    evaluation; memrl's own errors (settings, data, model: something the user fixes) propagate
    and are never stored."""
    from memrl.scoring import evaluate_spec

    try:
        return evaluate_spec(spec)
    except MemrlError:
        raise
    except (FloatingPointError, RuntimeError, ValueError, MemoryError) as exc:
        log.warning("evaluation %s failed: %s", spec.hash, exc)
        return failure(spec, f"{type(exc).__name__}: {exc}")


def _error_from_line(line: str) -> MemrlError:
    """The memrl error a worker reported as ``Name: message`` on its last stderr line."""
    from memrl import errors

    name, _, message = line.partition(": ")
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, MemrlError):
        return kind(message)
    return SpecError(line)


def run_subprocess(spec: EvalSpec) -> Evaluation:
    """Evaluate in a fresh worker process; a crash of the worker is a recorded failure."""
    with tempfile.TemporaryDirectory(prefix="memrl-eval-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "evaluation.json"
        spec_path.write_text(spec.to_json())
        cmd = [sys.executable, "-m", "memrl.backends", str(spec_path), str(out_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == _SPEC_ERROR_EXIT:
            raise _error_from_line(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return failure(spec, f"worker exited with code {proc.returncode}: {' | '.join(tail)}")
        return Evaluation.from_json(out_path.read_text())


def _ray_evaluate(spec_json: str, threads: int) -> str:
    """The Ray task: one evaluation in a fresh worker, returned as JSON to the driver."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_inprocess(EvalSpec.from_json(spec_json)).to_json()


def ensure_ray(ray_cfg: Any) -> Any:
    """``ray``, initialised: the cluster of ``ray.address`` or ``$RAY_ADDRESS``, else a local Ray."""
    try:
        import ray
    except ImportError:
        raise ConfigError("env.backend=ray needs Ray: pip install 'memrl[ray]'") from None
    if not ray.is_initialized():
        address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
        if address and address != "auto":
            check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot join the Ray cluster at ray.address={address!r} ({first[:150]}); start it with "
                "ray start --head, or fix ray.address / $RAY_ADDRESS"
            ) from None
        log.info("Ray: %s", ray.cluster_resources())
    return ray


RAY_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to a Ray address before calling it unreachable."""


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """Raise ConfigError unless ``address`` (``host:port`` or ``ray://host:port``) accepts a TCP
    connection within ``timeout`` seconds (``ray.init`` itself can wait for minutes)."""

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"ray.address={address!r} is not host:port, ray://host:port or auto; fix ray.address or "
            "$RAY_ADDRESS"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach Ray at {address} within {timeout:.0f} s ({exc.strerror or exc}); start the "
            "cluster (ray start --head) or fix ray.address / $RAY_ADDRESS"
        ) from None


def run_ray(specs: list[EvalSpec], ray_cfg: Any) -> list[Evaluation]:
    """Evaluate ``specs`` concurrently as Ray tasks; a task whose worker died ``max_retries + 1``
    times is a recorded failure."""
    ray = ensure_ray(ray_cfg)
    task = ray.remote(max_calls=1)(_ray_evaluate).options(  # a fresh worker per evaluation
        num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, max_retries=ray_cfg.max_retries
    )
    refs = [task.remote(spec.to_json(), int(ray_cfg.num_cpus)) for spec in specs]
    out = []
    for spec, ref in zip(specs, refs):
        try:
            out.append(Evaluation.from_json(ray.get(ref)))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MemrlError):
                raise exc.cause from None
            out.append(failure(spec, f"the evaluation raised in its Ray worker: {str(exc.cause)[:300]}"))
        except ray.exceptions.RayError as exc:
            tries = ray_cfg.max_retries + 1
            out.append(failure(spec, f"its Ray worker died {tries} time(s) ({type(exc).__name__})"))
    return out


def _worker(argv: list[str]) -> int:
    from memrl.scoring import evaluate_spec

    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = EvalSpec.from_json(spec_path.read_text())
    try:
        result = evaluate_spec(spec)
    except MemrlError as exc:  # a problem with the settings: the parent raises it, nothing is stored
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return _SPEC_ERROR_EXIT
    except Exception as exc:  # the worker reports every failure of the run to its parent
        traceback.print_exc()
        result = failure(spec, f"{type(exc).__name__}: {exc}")
    out_path.write_text(result.to_json())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_worker(sys.argv[1:]))
