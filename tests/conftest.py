"""Shared fixtures: every test runs on the tiny test config with its own cache folder."""

from __future__ import annotations

import os
import tempfile

import pytest

# One cache per test session (tiny base model and encoder are built once, in seconds).
os.environ.setdefault("MEMRL_CACHE", tempfile.mkdtemp(prefix="memrl-test-cache-"))


@pytest.fixture
def cfg():
    from memrl.config import load_config

    return load_config("test")


@pytest.fixture(scope="session")
def ctx():
    """The shared task context (splits, base model, search space, encoder) of the test config."""
    from memrl.config import load_config
    from memrl.evaluate import TaskContext

    return TaskContext.get(load_config("test"))
