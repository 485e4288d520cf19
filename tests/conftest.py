"""Shared fixtures: every test runs on the tiny test config with its own cache folder."""

from __future__ import annotations

import os
import tempfile

import pytest

# The user's cache, for slow tests on the default config (its base UNet takes ~10 min to pretrain).
USER_CACHE = os.environ.get("MEMRL_CACHE", os.path.expanduser("~/.cache/memrl"))
# One cache per test session (tiny base model and encoder are built once, in seconds).
os.environ.setdefault("MEMRL_CACHE", tempfile.mkdtemp(prefix="memrl-test-cache-"))


@pytest.fixture
def user_cache(monkeypatch):
    """Point memrl at the user's cache (slow tests reuse the default base model from there)."""
    monkeypatch.setenv("MEMRL_CACHE", USER_CACHE)
    return USER_CACHE


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
