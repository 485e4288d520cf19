"""EvaluationStore: every evaluation ever run, in sqlite (WAL), keyed by spec hash.

Several processes may read and write at once; each row is written in one transaction, so a
crash mid-evaluation leaves no partial row. ``python -m memrl.store PATH [--csv OUT]`` prints a
summary (and exports a CSV table: a tabular benchmark on which search methods compare in seconds).
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from memrl.evaluate import EvalSpec, Evaluation
from memrl.utils import atomic_path, cache_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    spec_hash TEXT PRIMARY KEY,
    mask TEXT NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    metrics TEXT NOT NULL,
    timings TEXT NOT NULL,
    versions TEXT NOT NULL,
    samples BLOB,
    spec TEXT,
    created REAL DEFAULT (unixepoch('subsec'))
)
"""


class EvaluationStore:
    """A sqlite file of :class:`~memrl.evaluate.Evaluation` rows keyed by spec hash."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "evaluations.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"{self.path}: not a memrl evaluation store ({exc}); move it away or choose "
                "another env.store path"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    def get(self, spec_hash: str) -> Evaluation | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM evaluations WHERE spec_hash = ?", (spec_hash,)).fetchone()
        return None if row is None else Evaluation.from_row(dict(row))

    def put(self, evaluation: Evaluation, spec: EvalSpec | None = None) -> None:
        row = evaluation.to_row()
        row["spec"] = spec.to_json() if spec is not None else None
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO evaluations ({columns}) VALUES ({marks})", tuple(row.values())
            )

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    def __contains__(self, spec_hash: str) -> bool:
        with self._connect() as db:
            found = db.execute("SELECT 1 FROM evaluations WHERE spec_hash = ?", (spec_hash,))
            return found.fetchone() is not None

    def rows(self) -> list[dict[str, Any]]:
        """Every evaluation as a flat dict: spec_hash, mask, ok, error, metrics..., timings."""
        with self._connect() as db:
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
                    "data_fingerprint": spec.get("fingerprints", {}).get("data", ""),
                    **json.loads(r["metrics"]),
                    **{f"time_{k}": v for k, v in json.loads(r["timings"]).items()},
                }
            )
        return out

    def export_csv(self, path: str | Path) -> Path:
        """Write every evaluation as a CSV table (atomically)."""
        rows = self.rows()
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return Path(path)


def summary(store: EvaluationStore) -> str:
    rows = store.rows()
    ok = [r for r in rows if r["ok"]]
    lines = [f"{store.path}: {len(rows)} evaluations ({len(rows) - len(ok)} failed)"]
    if ok:
        lines.append(
            f"{'mask':<20} {'method':<10} {'canary_copy':>11} {'canary_gap':>10} "
            f"{'kid':>8} {'heldout':>8} {'train%':>7} {'secs':>6}"
        )
        for r in ok[-40:]:
            lines.append(
                f"{r['mask']:<20} {r['method']:<10} {r.get('canary_copy_fraction', float('nan')):>11.3f} "
                f"{r.get('canary_loss_gap', float('nan')):>10.4f} {r.get('kid', float('nan')):>8.4f} "
                f"{r.get('heldout_loss', float('nan')):>8.4f} "
                f"{100 * r.get('trainable_fraction', 0):>7.2f} {r.get('time_total', 0):>6.1f}"
            )
    for r in rows:
        if not r["ok"]:
            lines.append(f"failed {r['mask']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memrl.store",
        description=summary.__doc__ or "Summarise (and export) an evaluation store.",
    )
    parser.add_argument("path", help="the sqlite store")
    parser.add_argument("--csv", help="also export every evaluation to this CSV file")
    args = parser.parse_args(argv)
    if not Path(args.path).is_file():
        print(f"error: {args.path}: no such store", file=sys.stderr)
        return 2
    try:
        store = EvaluationStore(args.path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(store))
    if args.csv:
        print(f"wrote {store.export_csv(args.csv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
