"""memrl's errors. Every one means "bad input or state, explained": the message names the file,
field or value and the fix, and the command-line tools print it as one line and exit with 2."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "EpisodeOverError",
    "MemrlError",
    "ModelError",
    "NotInStoreError",
    "PolicyError",
    "SpecError",
    "StoreError",
]


class MemrlError(ValueError):
    """Base class: a problem the user can fix, described in the message."""


class ConfigError(MemrlError):
    """A config file, field or value is wrong."""


class DataError(MemrlError):
    """A dataset file or folder cannot be used."""


class ModelError(MemrlError):
    """A model folder cannot be used."""


class PolicyError(MemrlError):
    """A policy file or card is missing, corrupt, unsafe, or does not fit this base model."""


class StoreError(MemrlError):
    """An evaluation store cannot be opened, read or written."""


class SpecError(MemrlError):
    """An evaluation spec does not match the task it names (fingerprints differ)."""


class NotInStoreError(MemrlError, KeyError):
    """The replay backend has no evaluation for this spec."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EpisodeOverError(MemrlError, RuntimeError):
    """``step`` was called after the episode ended (or before ``reset``)."""
