"""Shared fixtures: every test runs on the tiny test config with its own cache folder.

Structure tests (search space, PEFT methods, sampling shapes) use ``tiny_model``, a randomly
initialised UNet built in milliseconds, as diffusers' own tests do; tests about learning use
``ctx``, whose base model is pretrained (20 steps) once per session.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# The user's cache, for slow tests on the default config.
USER_CACHE = os.environ.get("MEMRL_CACHE", os.path.expanduser("~/.cache/memrl"))
# One cache per test session (tiny base model and encoder are built once, in seconds).
os.environ["MEMRL_CACHE"] = tempfile.mkdtemp(prefix="memrl-test-cache-")

LONGEST_FIRST = (
    "test_cli.py",
    "test_tables.py",
    "test_ray.py",
    "test_store.py",
    "test_stable_diffusion.py",
    "test_audit.py",
)
"""Test files that take longest (summed ``pytest --durations``, bench/README.md), longest first.
``make test`` hands whole files to two workers in collection order (``--no-loadscope-reorder``):
longest first, the two finish together; xdist's own order, by number of tests, started
test_ray.py (5 tests, about 200 s) last."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def user_cache(monkeypatch):
    """Point memrl at the user's cache (slow tests reuse the default's encoder from there)."""
    monkeypatch.setenv("MEMRL_CACHE", USER_CACHE)
    return USER_CACHE


@pytest.fixture
def cfg():
    from memrl.config import load_config

    return load_config("test")


@pytest.fixture
def tiny_model():
    """A random-initialised label-conditioned UNet of the test config's architecture."""
    import torch

    from memrl.config import load_config
    from memrl.models import DiffusionModel, build_unet

    torch.manual_seed(0)
    return DiffusionModel(build_unet(load_config("test")), num_classes=10)


@pytest.fixture(scope="session")
def ctx():
    """The shared task context (splits, pretrained base model, search space, encoder) of the test config."""
    from memrl.config import load_config
    from memrl.task import TaskContext

    return TaskContext.get(load_config("test"))
