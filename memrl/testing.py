"""Helpers for memrl's tests and for anyone testing code built on memrl (as diffusers ships
``diffusers.utils.testing_utils``): run a command in a subprocess, wait on an event."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

HANG = 1800.0
"""Seconds after which a wait counts as a hang: far beyond any slow machine, so a test waits on
events, not on a clock, and still fails instead of stalling CI."""


def run_module(*args: str, cwd: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a subprocess with this process's environment (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}
    )


def wait_until(done: Callable[[], bool], what: str, alive: Callable[[], None] = lambda: None) -> None:
    """Poll ``done`` until it holds; ``alive`` asserts what must stay true meanwhile."""
    deadline = time.monotonic() + HANG
    while not done():
        alive()
        assert time.monotonic() < deadline, f"{what}: nothing after {HANG:.0f} s, a hang"
        time.sleep(0.1)
