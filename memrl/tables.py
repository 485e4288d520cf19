"""MemControl-Bench: every mask of the default search space evaluated on every task of a suite.

A tabular benchmark in the style of NAS-Bench-201 / HPO-B: each (task, mask) is fine-tuned and
scored once, the table ships with memrl, and every search method and seed replays it in seconds
(``gym.make("MemControl-v0", config="bench")``). Rows are keyed by the spec hash, so the table
holds exactly what a live evaluation of the same task and mask would compute.

    python -m memrl.tables build                 # resumable; 2 single-threaded workers
    python -m memrl.tables status                # rows per task, what is missing
    python -m memrl.tables export                # working store -> memrl/assets/tables/bench.sqlite
    python -m memrl.tables rekey --store FILE    # re-key a store's rows after a fingerprint change

``build`` writes to a working store (``$MEMRL_CACHE/tables/<suite>.sqlite``, with samples);
``export`` writes the shipped table from it: no sample tensors, task descriptors, provenance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sqlite3
import statistics
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from memrl.cli import add_config_args, config_from_args, run_main
from memrl.config import Config, load_config
from memrl.context import TaskContext, full_unet, suite
from memrl.data import load_splits
from memrl.descriptor import descriptor_key
from memrl.errors import ConfigError, StoreError
from memrl.evaluator import SHIPPED, make_evaluator, shipped_dir, table_path  # noqa: F401  (re-exported)
from memrl.spec import SPEC_VERSION, EvalSpec
from memrl.store import EvaluationStore
from memrl.task import NOISE_SEEDS, Task, noise_masks  # noqa: F401  (re-exported)
from memrl.utils import atomic_path, cache_dir, package_versions, setup_logging

__all__ = [
    "CURVE_MASKS",
    "CURVE_NOISE_MASKS",
    "Job",
    "REFERENCE_STEPS",
    "build",
    "complete_tasks",
    "curve_jobs",
    "curve_masks",
    "curve_noise_masks",
    "export",
    "import_rows",
    "jobs",
    "main",
    "reference_config",
    "rekey",
    "status",
]

log = logging.getLogger("memrl.tables")


@dataclass(frozen=True)
class Job:
    task: str
    kind: str
    """``main`` (every mask, seed 0), ``full`` (every UNet parameter: the paper's full fine-tuning),
    ``noise`` (a mask sample, extra seeds) or ``reference`` (a curve table's fixed references)."""
    spec: EvalSpec


CURVE_MASKS = (
    "1111111",
    *("".join("1" if i == j else "0" for i in range(7)) for j in range(7)),
    *("0001010", "0001100", "0011000", "0011100", "0111010", "0111101", "1001110", "1101100"),
)
"""The masks every task of a curve table holds (MemControl-Bench v3, 7 attention groups): the mask
of ones, every single group, and the rest of the greedy portfolio (first 4 masks at memorization
weights 0.25, 0.5 and 0.75) on the 150-step table's training tasks (a test recomputes it)."""
CURVE_NOISE_MASKS = ("1111111", "0011100", "1000000", "0001100")
"""The masks a curve table also holds with fine-tune seeds :data:`NOISE_SEEDS` (and full
fine-tuning)."""
REFERENCE_STEPS = 150
"""A curve table's rewards are on references fixed per task: the masks of zeros and of ones,
plain evaluations at this many steps."""


def curve_masks(k: int) -> tuple[str, ...]:
    """A curve table's masks for a space of ``k`` groups: :data:`CURVE_MASKS` for base model v2's
    7 groups; for another space (a test config, a Stable Diffusion model) the mask of ones and
    every single group."""
    if k == len(CURVE_MASKS[0]):
        return CURVE_MASKS
    return ("1" * k, *("".join("1" if i == j else "0" for i in range(k)) for j in range(k)))


def curve_noise_masks(k: int) -> tuple[str, ...]:
    """The masks a curve table also holds with the noise seeds (the first two of
    :func:`curve_masks` outside the 7-group space)."""
    return CURVE_NOISE_MASKS if k == len(CURVE_MASKS[0]) else curve_masks(k)[:2]


def reference_config(cfg: Config) -> Config:
    """A curve task's config for its reference evaluations: plain, :data:`REFERENCE_STEPS` steps
    (outside control mode, which needs curves; the env section is not part of an evaluation)."""
    plain = {
        "finetune.checkpoint_every": None,
        "finetune.sample_at": None,
        "env.mode": "mask",
        "env.chunk": None,
        "env.mask_changes": "ignore",
    }
    return cfg.with_changes({"finetune.steps": REFERENCE_STEPS, **plain})


def curve_jobs(cfg: Config) -> list[Job]:
    """Every evaluation of a curve table (``finetune.checkpoint_every`` set): task by task, the
    references (:func:`reference_config`), the curves of :data:`CURVE_MASKS` and of full
    fine-tuning of every UNet parameter; then, task by task, :data:`CURVE_NOISE_MASKS` and full
    fine-tuning with the other seeds. Every task's curves at seed 0 (what replay, the controller
    and the premise need) exist before the noise rows (what their intervals need)."""
    out: list[Job] = []
    noise: list[Job] = []
    for e in suite(cfg):
        ctx = TaskContext.get(e.cfg)
        k = ctx.space.k
        ref = TaskContext.get(reference_config(e.cfg))
        out += [Job(e.name, "reference", ref.spec(m)) for m in ((0,) * k, (1,) * k)]
        out += [Job(e.name, "main", ctx.spec([int(c) for c in m])) for m in curve_masks(k)]
        whole = TaskContext.get(full_unet(e.cfg))
        out.append(Job(e.name, "full", whole.spec((1,) * whole.space.k)))
        for seed in NOISE_SEEDS:
            noisy = TaskContext.get(e.cfg.with_changes({"finetune.seed": seed}))
            noise += [Job(e.name, "noise", noisy.spec([int(c) for c in m])) for m in curve_noise_masks(k)]
            noisy_whole = TaskContext.get(full_unet(noisy.cfg))
            noise.append(Job(e.name, "noise", noisy_whole.spec((1,) * noisy_whole.space.k)))
    return out + noise


def build_order(
    todo: list[Job], first: list[str], entries: list[Any], noise_first: list[str] | None = None
) -> list[Job]:
    """``todo`` with the rows of the tasks named in ``first`` (noise seeds aside) moved ahead, then
    the noise-seed rows of those in ``noise_first``, in their order otherwise; a name that is not
    one of ``entries``' tasks is refused by name."""
    names = [e.name for e in entries]
    noise_first = noise_first or []
    for flag, asked in (("--first", first), ("--noise-first", noise_first)):
        unknown = [t for t in asked if t not in names]
        if unknown:
            raise ConfigError(
                f"{flag} {' '.join(unknown)}: no such task in this suite; its tasks: {', '.join(names)}"
            )

    def rank(j: Job) -> int:
        if j.kind != "noise":
            return 0 if j.task in first else 2
        return 1 if j.task in noise_first else 2

    return sorted(todo, key=rank)


def jobs(cfg: Config) -> list[Job]:
    """Every evaluation of the suite's tables, task by task (so the table grows a complete task
    at a time): the references, full fine-tuning of every UNet parameter, every other mask, then
    the task's noise sample (the first ``noise_masks`` of :func:`noise_masks` with seeds
    :data:`NOISE_SEEDS`) if it has one. A curve suite's are :func:`curve_jobs`."""
    if cfg.finetune.checkpoint_every:
        return curve_jobs(cfg)
    out: list[Job] = []
    entries = suite(cfg)
    noise_size = {e.name: int(t.get("noise_masks", 0)) for e, t in zip(entries, cfg.env.tasks, strict=False)}
    for e in entries:
        ctx = TaskContext.get(e.cfg)
        k = ctx.space.k
        every = list(itertools.product((0, 1), repeat=k))
        out += [Job(e.name, "main", ctx.spec(m)) for m in ((0,) * k, (1,) * k)]
        whole = TaskContext.get(full_unet(e.cfg))
        out.append(Job(e.name, "full", whole.spec((1,) * whole.space.k)))
        order = np.random.default_rng(0).permutation(len(every))
        out += [Job(e.name, "main", ctx.spec(every[i])) for i in order]
        for seed in NOISE_SEEDS if noise_size.get(e.name) else ():
            noisy = TaskContext.get(e.cfg.with_changes({"finetune.seed": seed}))
            out += [Job(e.name, "noise", noisy.spec(m)) for m in noise_masks(k, noise_size[e.name])]
    seen: set[str] = set()
    return [j for j in out if not (j.spec.hash in seen or seen.add(j.spec.hash))]  # type: ignore[func-returns-value]


def import_rows(store_path: Path, table: Path) -> int:
    """Copy the rows and descriptors of ``table`` that ``store_path`` lacks (a shipped table
    seeds the working store, so a build continues on any machine). Returns the rows added."""
    EvaluationStore(table, readonly=True)  # checks it is a sound store
    EvaluationStore(store_path)
    with closing(sqlite3.connect(store_path, timeout=60)) as db, db:
        db.execute("ATTACH DATABASE ? AS src", (f"{table.resolve().as_uri()}?mode=ro",))
        before = db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        shared = [r[1] for r in db.execute("PRAGMA src.table_info(evaluations)")]
        names = ", ".join(shared)
        db.execute(f"INSERT OR IGNORE INTO evaluations ({names}) SELECT {names} FROM src.evaluations")
        db.execute("INSERT OR IGNORE INTO descriptors SELECT * FROM src.descriptors")
        return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] - before)


def rekey(store_path: Path) -> int:
    """Give every row of ``store_path`` the data fingerprint this memrl computes from the row's own
    settings, and re-hash it (descriptors follow their rows). Rows keyed by an older fingerprint
    (memrl before the source digest hashed resized pixels, which differ between CPUs) are found
    again; a row whose key is already current is left alone. Atomic: the store is rewritten in one
    transaction. Returns the rows re-keyed."""

    EvaluationStore(store_path)  # checks it is a sound, writable store
    new_data: dict[str, str] = {}
    moved = 0
    with closing(sqlite3.connect(store_path, timeout=60)) as db, db:
        rows = db.execute("SELECT spec_hash, spec FROM evaluations WHERE spec IS NOT NULL").fetchall()
        descriptor_keys: dict[str, str] = {}
        for old_hash, text in rows:
            spec = EvalSpec.from_json(text)
            data = json.dumps(spec.settings["data"], sort_keys=True)
            if data not in new_data:
                new_data[data] = load_splits(load_config(spec.settings).data).fingerprint
            fingerprints = {**spec.fingerprints, "data": new_data[data]}
            new = EvalSpec(spec.settings, spec.mask, fingerprints, spec.version)
            descriptor_keys[descriptor_key(spec.fingerprints)] = descriptor_key(fingerprints)
            if new.hash == old_hash:
                continue
            db.execute(
                "UPDATE OR REPLACE evaluations SET spec_hash = ?, spec = ? WHERE spec_hash = ?",
                (new.hash, new.to_json(), old_hash),
            )
            moved += 1
        for old_key, new_key in descriptor_keys.items():
            if old_key != new_key:
                db.execute("UPDATE OR REPLACE descriptors SET key = ? WHERE key = ?", (new_key, old_key))
    log.info("re-keyed %d of %d rows in %s", moved, len(rows), store_path)
    return moved


def build(
    cfg: Config,
    store_path: Path,
    workers: int,
    threads: int,
    limit: int | None = None,
    seed_from: Path | None = None,
    backend: str = "pool",
    first: list[str] | None = None,
    noise_first: list[str] | None = None,
) -> int:
    """Evaluate every missing row into the working store (after importing ``seed_from``, a
    table built earlier): ``workers`` single-threaded local processes (``pool``), or Ray tasks
    (``ray``: ``workers`` at a time, on the cluster of ``ray.address``); ``first``: these tasks'
    rows, noise seeds aside, before the rest, then ``noise_first``: these tasks' noise-seed rows
    (in :func:`jobs`' order otherwise). Returns how many were evaluated."""

    if seed_from is not None and seed_from.is_file():
        log.info("imported %d rows from %s", import_rows(store_path, seed_from), seed_from)
    store = EvaluationStore(store_path)
    todo_all = jobs(cfg)
    have = store.hashes()
    missing = [j for j in todo_all if j.spec.hash not in have]
    todo = build_order(missing, first or [], suite(cfg), noise_first)[:limit]
    log.info(
        "%d of %d evaluations stored; %d to run with %d workers x %d threads",
        len(todo_all) - len([j for j in todo_all if j.spec.hash not in have]),
        len(todo_all),
        len(todo),
        workers,
        threads,
    )
    live = cfg.with_changes({"env.backend": "inprocess", "env.store": str(store_path), "env.table": None})
    evaluator = make_evaluator(live)
    pending = {j.task for j in todo}
    for e in suite(live):  # each task's descriptor; an unfinished task's encoder, cached for the workers
        task = Task(e.cfg, evaluator, e.name, e.heldout)
        if e.name in pending:  # (a build resumed on a new machine trains none for finished tasks)
            _ = task.context.encoder
        task.descriptor()
    if not todo:
        return 0
    start, done = time.time(), 0
    by_hash = {j.spec.hash: j for j in todo}
    with tqdm(total=len(todo), desc="tables", unit="eval", smoothing=0.05) as bar:
        for ev in evaluator.stream([j.spec for j in todo], workers, threads, backend):
            done += 1
            bar.update()
            rate = done / (time.time() - start) * 3600
            left = (len(todo) - done) / max(rate, 1e-9)
            log.info(
                "%d/%d %s %s %s (%.0f evals/hour, %.1f h left)",
                done,
                len(todo),
                by_hash[ev.spec_hash].task,
                "".join(map(str, ev.mask)),
                "ok" if ev.ok else ev.error,
                rate,
                left,
            )
    return done


def _check_export_target(source: Path, out: Path, rows: set[str], force: bool) -> None:
    """Refuse to overwrite anything but an older memrl table with fewer rows: another file, a
    directory, the working store itself, or a table holding rows the export would lose."""
    if out.is_dir():
        raise StoreError(
            f"--out {out} is a directory; name the table file to write, e.g. {out / 'bench.sqlite'}"
        )
    if not out.exists():
        return
    if out.resolve() == source.resolve():
        raise StoreError(f"--out {out} is the working store itself; write the table to another file")
    try:
        existing = EvaluationStore(out, readonly=True)
        is_table = "provenance" in existing.notes()
        have = existing.hashes()
    except StoreError:
        is_table = False
    if not is_table:
        raise StoreError(
            f"--out {out} exists and is not a MemControl-Bench table; memrl will not overwrite it: "
            "choose another --out, or move the file away"
        )
    lost = have - rows
    if lost and not force:
        raise StoreError(
            f"--out {out} holds {len(lost):,} rows that {source} lacks (it has {len(rows):,}); exporting "
            "would drop them. Seed the working store from it first (python -m memrl.tables build does), "
            "or pass --force to replace it anyway"
        )


def export(store_path: Path, out: Path, suite_name: str, force: bool = False) -> Path:
    """Write the shipped table: every row without samples, descriptors, provenance notes. An
    existing ``out`` is replaced only when it is a table whose every row the working store has
    (or with ``force``); anything else is refused (see :func:`_check_export_target`)."""
    source = EvaluationStore(store_path, readonly=True)
    _check_export_target(store_path, out, source.hashes(), force)
    rows = source.rows()
    seconds = [r["time_total"] for r in rows if r["ok"] and "time_total" in r]
    provenance = {
        "suite": suite_name,
        "memrl_spec_version": SPEC_VERSION,
        "rows": len(rows),
        "failed": sum(not r["ok"] for r in rows),
        "seconds_per_evaluation_median": round(statistics.median(seconds), 1) if seconds else None,
        "versions": package_versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, single-threaded workers",
        "date": time.strftime("%Y-%m-%d"),
    }
    with atomic_path(out) as tmp:
        tmp.unlink()
        db = sqlite3.connect(tmp.resolve().as_uri(), uri=True)
        db.execute("ATTACH DATABASE ? AS src", (f"{source.path.resolve().as_uri()}?mode=ro",))
        schema = db.execute("SELECT sql FROM src.sqlite_master WHERE type='table'").fetchall()
        for (sql,) in schema:
            db.execute(sql)
        kept = [r[1] for r in db.execute("PRAGMA src.table_info(evaluations)") if r[1] != "samples"]
        names = ", ".join(kept)
        db.execute(f"INSERT INTO evaluations ({names}) SELECT {names} FROM src.evaluations")
        db.execute("INSERT INTO descriptors SELECT * FROM src.descriptors")
        db.execute("INSERT INTO notes VALUES ('provenance', ?)", (json.dumps(provenance),))
        db.commit()
        db.execute("DETACH DATABASE src")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("VACUUM")
        db.close()
    return out


def complete_tasks(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """``cfg.env.tasks`` without the training tasks whose tables lack a mask (held-out tasks are
    kept: nothing trains on them), and the names of those left out."""
    evaluator = make_evaluator(cfg)
    left_out = []
    for e in suite(cfg):
        if e.heldout:
            continue
        ctx = TaskContext.get(e.cfg)
        masks = itertools.product((0, 1), repeat=ctx.space.k)
        if any(evaluator.lookup(ctx.spec(m).hash) is None for m in masks):
            left_out.append(e.name)
    return [t for t in cfg.env.tasks if t.get("name") not in left_out], left_out


def status(cfg: Config, store_path: Path) -> str:
    """Rows stored per task and kind, and how many carry membership-inference metrics (rows
    evaluated before they existed lack them)."""
    have, with_mia = set(), set()
    if store_path.is_file():
        store = EvaluationStore(store_path, readonly=True)
        have = store.hashes()
        with closing(sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT spec_hash FROM evaluations WHERE metrics LIKE '%mia_auc_private%'")
            with_mia = {h for (h,) in found}
    counts: dict[tuple[str, str], list[int]] = {}
    for j in jobs(cfg):
        c = counts.setdefault((j.task, j.kind), [0, 0, 0])
        c[0] += j.spec.hash in have
        c[1] += 1
        c[2] += j.spec.hash in with_mia
    lines = [f"{store_path}: rows stored / in the suite (rows with membership inference)"]
    lines += [f"  {t:<24} {k:<6} {a:>4}/{b:<4} ({m})" for (t, k), (a, b, m) in counts.items()]
    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return "\n".join([*lines, f"  {'all':<31} {total[0]:>4}/{total[1]:<4} ({total[2]})"])


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m memrl.tables",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("command", choices=("build", "status", "export", "rekey"))
    add_config_args(parser, seed=False)
    parser.set_defaults(config="bench")
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="working store (default: $MEMRL_CACHE/tables/<config>.sqlite)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="export: the table file (default: the shipped one)"
    )
    parser.add_argument("--workers", type=int, default=2, help="evaluations at once (default 2)")
    parser.add_argument(
        "--backend",
        choices=("pool", "ray"),
        default="pool",
        help="pool: single-threaded local processes; ray: Ray tasks (ray.* settings, e.g. a cluster)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="build: at most this many evaluations")
    parser.add_argument(
        "--force", action="store_true", help="export: replace a table even if it holds rows the store lacks"
    )
    parser.add_argument("--log", type=Path, default=None, help="also log progress to this file")
    parser.add_argument(
        "--first",
        nargs="+",
        default=None,
        help="build: these tasks' rows (noise seeds aside) before the rest",
    )
    parser.add_argument(
        "--noise-first",
        nargs="+",
        default=None,
        help="build: then these tasks' noise-seed rows (what intervals over fine-tune noise need)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    name = Path(str(args.config)).stem
    store_path = args.store or cache_dir() / "tables" / f"{name}.sqlite"

    def body() -> int:
        for flag, value, least in (
            ("--workers", args.workers, 1),
            ("--threads", args.threads, 1),
            ("--limit", args.limit, 0),
        ):
            if value is not None and value < least:
                raise StoreError(f"{flag}={value} must be {least} or more")
        if store_path.exists() and not store_path.is_file():
            raise StoreError(
                f"--store {store_path}: not a regular file (a folder or a device); name a store file"
            )
        cfg = config_from_args(args)
        if args.command == "build":
            shipped = shipped_dir() / f"{name}.sqlite"
            n = build(
                cfg,
                store_path,
                args.workers,
                args.threads,
                args.limit,
                shipped,
                args.backend,
                args.first,
                args.noise_first,
            )
            print(f"evaluated {n}; working store {store_path}")
        elif args.command == "status":
            shipped = shipped_dir() / f"{name}.sqlite"
            fallback = args.store is None and not store_path.is_file() and shipped.is_file()
            if fallback:
                print(f"no working store at {store_path}; the shipped table:")
            print(status(cfg, shipped if fallback else store_path))
        elif args.command == "rekey":
            if args.store is None:
                raise StoreError("rekey needs --store FILE: the store whose rows to re-key")
            print(f"re-keyed {rekey(args.store)} rows of {args.store}")
        else:
            out = export(store_path, args.out or shipped_dir() / f"{name}.sqlite", name, args.force)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run_main(
        body, interrupted=f"stored evaluations are kept in {store_path}; rerun the command to continue"
    )


if __name__ == "__main__":
    sys.exit(main())
