"""EvaluationStore: every evaluation ever run, in sqlite, keyed by spec hash.

Several processes may read and write at once (WAL); each row is written in one transaction, so a
crash mid-evaluation leaves no partial row. A store opened read-only is never modified, and memrl
never adds its table to another application's database. Beside the evaluations a store keeps
task descriptors (so replaying a table needs no base model or encoder) and provenance notes.

    python -m memrl.store PATH                 # summary (read-only)
    python -m memrl.store PATH --csv OUT.csv   # and export every evaluation as a CSV table
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from memrl.cli import run_main
from memrl.errors import StoreError
from memrl.spec import EvalSpec, Evaluation, with_derived_metrics
from memrl.utils import atomic_path, cache_dir

__all__ = ["EvaluationStore", "from_row", "main", "summary", "to_row"]

_COLUMNS = {
    "spec_hash": "TEXT PRIMARY KEY",
    "mask": "TEXT NOT NULL",
    "ok": "INTEGER NOT NULL",
    "error": "TEXT",
    "metrics": "TEXT NOT NULL",
    "timings": "TEXT NOT NULL",
    "versions": "TEXT NOT NULL",
    "samples": "BLOB",
    "spec": "TEXT",
    "created": "REAL DEFAULT (unixepoch('subsec'))",
    "curve": "TEXT",
}
_ADDED = {"curve"}
"""Columns added after stores were first shipped: a store without them is read as it is (rows
without a curve) and gains them the first time it is opened for writing."""
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS evaluations ("
    + ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
    + ")",
    "CREATE TABLE IF NOT EXISTS descriptors "
    "(key TEXT PRIMARY KEY, task TEXT NOT NULL, descriptor TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def to_row(evaluation: Evaluation, spec: EvalSpec | None = None, keep_samples: bool = True) -> dict[str, Any]:
    """The sqlite row of an evaluation (samples as a compressed .npz blob)."""
    blob = None
    if keep_samples and evaluation.samples is not None:
        buf = io.BytesIO()
        nearest = evaluation.nearest if evaluation.nearest is not None else np.zeros(0, dtype=np.int64)
        np.savez_compressed(buf, samples=evaluation.samples, nearest=nearest)
        blob = buf.getvalue()
    return {
        "spec_hash": evaluation.spec_hash,
        "mask": json.dumps(list(evaluation.mask)),
        "ok": int(evaluation.ok),
        "error": evaluation.error,
        "metrics": json.dumps(evaluation.metrics),
        "timings": json.dumps(evaluation.timings),
        "versions": json.dumps(evaluation.versions),
        "samples": blob,
        "spec": spec.to_json() if spec is not None else None,
        "curve": json.dumps(evaluation.curve) if evaluation.curve is not None else None,
    }


def from_row(row: dict[str, Any]) -> Evaluation:
    samples = nearest = None
    if row.get("samples"):
        with np.load(io.BytesIO(row["samples"]), allow_pickle=False) as data:
            samples, nearest = data["samples"], data["nearest"]
    return Evaluation(
        spec_hash=row["spec_hash"],
        mask=tuple(json.loads(row["mask"])),
        metrics=json.loads(row["metrics"]),
        ok=bool(row["ok"]),
        error=row["error"],
        timings=json.loads(row["timings"]),
        versions=json.loads(row["versions"]),
        samples=samples,
        nearest=nearest,
        curve=json.loads(row["curve"]) if row.get("curve") else None,
    )


class EvaluationStore:
    """A sqlite file of :class:`~memrl.spec.Evaluation` rows keyed by spec hash.

    Args:
        path: the sqlite file; None uses ``$MEMRL_CACHE/evaluations.sqlite``.
        readonly: open without ever writing (the file must exist and be a memrl store).
    """

    def __init__(self, path: str | Path | None = None, readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "evaluations.sqlite"
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise StoreError(f"{self.path}: no such evaluation store")
        if not readonly:
            self._create()
        self._check()

    def _create(self) -> None:
        for attempt in range(50):  # several processes may create the same new store at once
            try:
                self._create_once()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise StoreError(self._explain(exc)) from None
                time.sleep(0.1)

    def _create_once(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db, db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "evaluations" not in tables:
                    raise StoreError(
                        f"{self.path}: an sqlite database of another application (tables "
                        f"{', '.join(sorted(tables))}); memrl will not add to it: choose another env.store"
                    )
                if "evaluations" not in tables and db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL").fetchall()
                for statement in _SCHEMA:
                    db.execute(statement)
                have = {r[1] for r in db.execute("PRAGMA table_info(evaluations)")}
                for name in sorted(_ADDED - have):
                    db.execute(f"ALTER TABLE evaluations ADD COLUMN {name} {_COLUMNS[name]}")
        except sqlite3.OperationalError:
            raise  # locked (retried by the caller), read-only, cannot open: explained there
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path}: not a memrl evaluation store ({exc}); move it away or choose another env.store"
            ) from None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store here ({exc.strerror})") from None

    def _explain(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if "readonly" in text:
            return f"{self.path}: read-only; make it writable or choose another env.store"
        if "unable to open" in text:
            return (
                f"{self.path}: cannot open or create the store ({text}); check that {self.path.parent} "
                "exists and is writable, or choose another env.store"
            )
        return f"{self.path}: {text}"

    def _check(self) -> None:
        """The file is a readable memrl store: our table with our columns, and sound pages."""
        try:
            with closing(self._connect()) as db:
                columns = {r[1] for r in db.execute("PRAGMA table_info(evaluations)")}
                integrity = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise StoreError(
                    f"{self.path}: cannot open it here ({exc}); a store in WAL mode needs write access to "
                    "its folder even to be read: copy it to a writable folder, or use a table exported "
                    "by python -m memrl.tables export"
                ) from None
            raise StoreError(f"{self.path}: not a memrl evaluation store ({exc}); move it away") from None
        except sqlite3.Error as exc:
            raise StoreError(
                f"{self.path}: not a memrl evaluation store ({exc}); move it away or choose another env.store"
            ) from None
        if not columns:
            raise StoreError(f"{self.path}: an sqlite database without memrl's evaluations table")
        missing = set(_COLUMNS) - _ADDED - columns
        if missing:
            raise StoreError(
                f"{self.path}: its evaluations table lacks columns {sorted(missing)}: not a store of "
                "this memrl version; move it away or choose another env.store"
            )
        if integrity != "ok":
            first = "; ".join(line.strip() for line in str(integrity).splitlines() if line.strip())[:150]
            raise StoreError(
                f"{self.path}: the database is damaged ({first}); restore it from a copy or move it away"
            )

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        else:
            db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            with db:
                yield db
        except sqlite3.OperationalError as exc:
            raise StoreError(self._explain(exc)) from None
        finally:
            db.close()

    def get(self, spec_hash: str) -> Evaluation | None:
        return self.get_many([spec_hash]).get(spec_hash)

    def get_many(self, spec_hashes: Sequence[str]) -> dict[str, Evaluation]:
        """The stored evaluations among ``spec_hashes``, by hash, read over one connection (opening
        one per row costs more than the query)."""
        hashes, found = list(dict.fromkeys(spec_hashes)), {}
        with self._db() as db:
            for i in range(0, len(hashes), 500):  # under SQLite's limit on bound parameters
                part = hashes[i : i + 500]
                marks = ", ".join("?" * len(part))
                for row in db.execute(f"SELECT * FROM evaluations WHERE spec_hash IN ({marks})", part):
                    found[row["spec_hash"]] = from_row(dict(row))
        return found

    def put(self, evaluation: Evaluation, spec: EvalSpec | None = None, keep_samples: bool = True) -> None:
        """Insert (or replace) one evaluation in one transaction."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; evaluations cannot be added")
        row = to_row(evaluation, spec, keep_samples)
        columns, marks = ", ".join(row), ", ".join("?" for _ in row)
        with self._db() as db:
            db.execute(
                f"INSERT OR REPLACE INTO evaluations ({columns}) VALUES ({marks})", tuple(row.values())
            )

    def __len__(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    def __contains__(self, spec_hash: str) -> bool:
        with self._db() as db:
            found = db.execute("SELECT 1 FROM evaluations WHERE spec_hash = ?", (spec_hash,))
            return found.fetchone() is not None

    def hashes(self) -> set[str]:
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT spec_hash FROM evaluations")}

    # -- descriptors and notes ----------------------------------------------------------------
    def put_descriptor(self, key: str, task: dict[str, Any], descriptor: np.ndarray) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO descriptors VALUES (?, ?, ?)",
                (key, json.dumps(task, sort_keys=True), json.dumps([float(v) for v in descriptor])),
            )

    def descriptor(self, key: str) -> np.ndarray | None:
        with self._db() as db:
            row = db.execute("SELECT descriptor FROM descriptors WHERE key = ?", (key,)).fetchone()
        return None if row is None else np.asarray(json.loads(row[0]), dtype=np.float32)

    def set_note(self, key: str, value: Any) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO notes VALUES (?, ?)", (key, json.dumps(value)))

    def notes(self) -> dict[str, Any]:
        with self._db() as db:
            return {r[0]: json.loads(r[1]) for r in db.execute("SELECT key, value FROM notes")}

    # -- tables -------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Every evaluation as a flat dict: spec_hash, mask, ok, error, metrics... (with the derived
        ones, as :class:`~memrl.spec.Evaluation` has them), timings."""
        with self._db() as db:
            raw = db.execute(
                "SELECT spec_hash, mask, ok, error, metrics, timings, spec FROM evaluations ORDER BY created"
            ).fetchall()
        out = []
        for r in raw:
            spec = json.loads(r["spec"]) if r["spec"] else {}
            settings = spec.get("settings", {})
            out.append(
                {
                    "spec_hash": r["spec_hash"],
                    "mask": "".join(map(str, json.loads(r["mask"]))),
                    "ok": bool(r["ok"]),
                    "error": r["error"] or "",
                    "method": settings.get("search", {}).get("method", ""),
                    "seed": settings.get("finetune", {}).get("seed", ""),
                    "data_fingerprint": spec.get("fingerprints", {}).get("data", ""),
                    **with_derived_metrics(json.loads(r["metrics"])),
                    **{f"time_{k}": v for k, v in json.loads(r["timings"]).items()},
                }
            )
        return out

    def export_csv(self, path: str | Path) -> Path:
        """Write every evaluation as a CSV table (atomically); never over the store itself."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise StoreError(f"{path}: this is the store itself; export the CSV to another file")
        rows = self.rows()
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path


def summary(store: EvaluationStore) -> str:
    """Summarise a store: counts, the latest evaluations' main metrics, and failures."""
    rows = store.rows()
    ok = [r for r in rows if r["ok"]]
    lines = [f"{store.path}: {len(rows)} evaluations ({len(rows) - len(ok)} failed)"]
    notes = store.notes()
    if notes.get("provenance"):
        lines.append("provenance: " + json.dumps(notes["provenance"]))
    if ok:
        lines.append(
            f"{'mask':<20} {'method':<10} {'canary_copy':>11} {'canary_gap':>10} "
            f"{'kid':>8} {'heldout':>8} {'train%':>7} {'secs':>6}"
        )
        nan = float("nan")
        for r in ok[-40:]:
            lines.append(
                f"{r['mask']:<20} {r['method']:<10} {r.get('canary_copy_fraction', nan):>11.3f} "
                f"{r.get('canary_loss_gap', nan):>10.4f} {r.get('kid', nan):>8.4f} "
                f"{r.get('heldout_loss', nan):>8.4f} "
                f"{100 * r.get('trainable_fraction', 0):>7.2f} {r.get('time_total', 0):>6.1f}"
            )
    for r in rows:
        if not r["ok"]:
            lines.append(f"failed {r['mask']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m memrl.store", description=summary.__doc__)
    parser.add_argument("path", type=Path, help="the sqlite store (opened read-only)")
    parser.add_argument("--csv", type=Path, help="also export every evaluation to this CSV file")
    args = parser.parse_args(argv)

    def body() -> int:
        store = EvaluationStore(args.path, readonly=True)
        print(summary(store))
        if args.csv:
            print(f"wrote {store.export_csv(args.csv)}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
