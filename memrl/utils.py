"""Small shared helpers: stable hashes, cache folder, atomic writes, package versions, logging."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memrl.errors import MemrlError

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "cache_dir",
    "folder_lock",
    "package_versions",
    "setup_logging",
    "stable_hash",
    "without_none",
]

_PACKAGES = (
    "memrl",
    "torch",
    "diffusers",
    "peft",
    "gymnasium",
    "stable-baselines3",
    "torchmetrics",
    "faiss-cpu",
    "numpy",
)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys), cut to ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def without_none(tree: Any) -> Any:
    """``tree`` with every dict entry whose value is None removed (recursively)."""
    if isinstance(tree, dict):
        return {k: without_none(v) for k, v in tree.items() if v is not None}
    return tree


def cache_dir() -> Path:
    """``$MEMRL_CACHE`` or ``~/.cache/memrl``; created on first use."""
    path = Path(os.environ.get("MEMRL_CACHE", Path.home() / ".cache" / "memrl"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def folder_lock(folder: Path, what: str = "--out") -> Iterator[None]:
    """Hold ``folder`` for this process (a ``.memrl-lock`` file with its pid): a second memrl
    process writing the same folder is refused with one line, not left to overwrite its results.
    A lock left by a process that no longer runs is taken over."""

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".memrl-lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise MemrlError(
                    f"{what} {folder} is being written by another memrl process (pid {pid}); wait for it "
                    "to finish or choose another folder"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.
    Raises :class:`~memrl.errors.MemrlError` when ``path`` is a directory."""

    path = Path(path)
    if path.is_dir():
        raise MemrlError(f"{path} is a directory; name a file to write (for example {path / 'out'}.csv)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (missing ones are omitted)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def setup_logging(level: int = 20, log_file: Path | None = None) -> None:
    """Logging for the command-line tools: memrl at INFO, chatty dependencies at WARNING;
    ``log_file``: also append every record, with its time, to that file (progress included), so
    a run whose terminal output goes nowhere can be followed with ``tail -f``."""

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("faiss", "faiss.loader", "httpx", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if log_file is not None:
        root = logging.getLogger()
        target = str(Path(log_file).resolve())
        if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
