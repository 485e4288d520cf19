"""The layout of a run folder (``train_agent``'s ``runs/<time>-<hash>/``), owned here: every module
that reads or writes a run's files asks :class:`RunFolder` for the path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["STORE_FILE", "RunFolder"]

STORE_FILE = "evaluations.sqlite"
"""The evaluation store's name in a run or results folder (``env.store``'s default)."""


@dataclass(frozen=True)
class RunFolder:
    """Where each file of a run lives under ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved config (``--resume`` reads it back)."""
        return self.root / "config.yaml"

    @property
    def record(self) -> Path:
        """``run.json``: seed, config hash, versions, fingerprints and status."""
        return self.root / "run.json"

    @property
    def store(self) -> Path:
        return self.root / STORE_FILE

    @property
    def episodes(self) -> Path:
        """One JSON line per finished episode (the report reads it)."""
        return self.root / "episodes.jsonl"

    @property
    def checkpoint(self) -> Path:
        """PPO's resumable checkpoint, rewritten after every rollout."""
        return self.root / "checkpoints" / "last.zip"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def log(self) -> Path:
        """Every log line of the run, with its time (progress included)."""
        return self.root / "train.log"

    @property
    def policy(self) -> Path:
        """The trained policy (its card and prior lie beside it: ``memrl.agents.policy``)."""
        return self.root / "policy.zip"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def check(self) -> Path:
        """The live check of the chosen mask against the table (``--config bench``)."""
        return self.root / "check.json"

    def figure(self, name: str) -> Path:
        """A report figure: ``reward``, ``samples``, ``pareto``, ``preferences``."""
        return self.root / f"{name}.png"
