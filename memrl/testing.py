"""Helpers for memrl's tests and for anyone testing code built on memrl (as diffusers ships
``diffusers.utils.testing_utils``): run a command in a separate process, wait on an event.

A fresh interpreter spends about 10 s of CPU importing torch, diffusers (which pulls in peft and
transformers) and stable-baselines3 before any memrl code runs; the suite runs about 70 commands.
So :func:`run_module` forks each command from a *zygote*, one helper interpreter per test process
that imports those libraries once and never runs a torch operation (no thread pool exists when it
forks). A forked command is still a process of its own: its own ``__main__``, environment,
working folder, exit code, stdout and stderr, and an interpreter exit without the module teardown
(threads joined, ``atexit`` run, output flushed).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["HANG", "IMPORT_TIME", "PRELOAD", "run_module", "wait_until", "zygote"]

HANG = 1800.0
"""Seconds after which a wait counts as a hang: far beyond any slow machine, so a test waits on
events, not on a clock, and still fails instead of stalling CI."""

PRELOAD = ("torch", "diffusers", "peft", "stable_baselines3", "gymnasium", "torchmetrics", "faiss")
"""What the zygote imports before it forks (libraries only: memrl's own modules load per command)."""
IMPORT_TIME = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED", "PYTHONPATH")
"""Variables read when those libraries are imported: a command that changes one gets a fresh
interpreter instead of a fork."""

_zygote: subprocess.Popen | None = None
_zygote_env: dict[str, str | None] = {}  # its IMPORT_TIME variables
_lock = threading.Lock()


def run_module(*args: str, cwd: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a separate process with this process's environment (plus ``env``),
    forked from the zygote unless ``env`` changes a variable in :data:`IMPORT_TIME`."""
    full = {**os.environ, **env}
    command = [sys.executable, "-m", *args]
    with _lock, tempfile.TemporaryDirectory(prefix="memrl-run-") as tmp:
        zygote = _started_zygote()
        if any(full.get(k) != _zygote_env[k] for k in IMPORT_TIME):
            return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=full)
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {
            "args": list(args),
            "cwd": cwd or os.getcwd(),
            "env": full,
            "out": str(out),
            "err": str(err),
        }
        assert zygote.stdin is not None and zygote.stdout is not None
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        reply = zygote.stdout.readline()
        if not reply:
            raise RuntimeError(f"the test zygote died (exit code {zygote.poll()}) running {command}")
        return subprocess.CompletedProcess(command, int(reply), out.read_text(), err.read_text())


def _started_zygote() -> subprocess.Popen:
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote_env.update({k: os.environ.get(k) for k in IMPORT_TIME})
        _zygote = subprocess.Popen(
            [sys.executable, "-c", "from memrl.testing import zygote; zygote()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    return _zygote


def zygote() -> None:
    """The zygote's loop: import :data:`PRELOAD`, then per request line (JSON: args, cwd, env, and
    the files for stdout and stderr) fork a child that runs ``python -m args`` and answer with its
    exit code; ends when stdin closes."""

    for name in PRELOAD:
        importlib.import_module(name)
    importlib.import_module("diffusers").UNet2DConditionModel  # noqa: B018 (diffusers imports lazily)
    protocol = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child becomes `python -m args`; SystemExit ends it as it would end one
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            for fd, path in ((1, request["out"]), (2, request["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            protocol.close()
            sys.stdin = open(os.devnull)  # noqa: SIM115
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            sys.path[0] = request["cwd"]
            sys.argv = [request["args"][0], *request["args"][1:]]
            os._exit(_run_as_main(request["args"][0]))
        _, status = os.waitpid(pid, 0)
        protocol.write(f"{os.waitstatus_to_exitcode(status)}\n")
        protocol.flush()


def _run_as_main(module: str) -> int:
    """Run ``module`` as ``__main__`` and end as the interpreter would, minus the module teardown
    (seconds with torch loaded; objects are not promised a finaliser at exit anyway): non-daemon
    threads joined, ``atexit`` handlers run, output flushed. Returns the exit code."""

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx does first, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def wait_until(done: Callable[[], bool], what: str, alive: Callable[[], None] = lambda: None) -> None:
    """Poll ``done`` until it holds; ``alive`` asserts what must stay true meanwhile."""
    deadline = time.monotonic() + HANG
    while not done():
        alive()
        assert time.monotonic() < deadline, f"{what}: nothing after {HANG:.0f} s, a hang"
        time.sleep(0.1)
