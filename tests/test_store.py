"""The evaluation store through its API: round trips, failures, concurrency, crashes, bad files."""

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memrl.errors import NotInStoreError, StoreError
from memrl.evaluator import Evaluator
from memrl.reward import References, Reward, pareto_front
from memrl.spec import EvalSpec, Evaluation
from memrl.store import EvaluationStore
from memrl.testing import run_module, wait_until


def test_evaluation_round_trips_through_the_store(cfg, ctx, tmp_path):
    store = EvaluationStore(tmp_path / "s.sqlite")
    ev = Evaluator(store, "inprocess")
    spec = ctx.spec([1, 0, 1, 0])
    first = ev.evaluate(spec)
    assert first.ok and not first.cache_hit and ev.misses == 1
    again = Evaluator(EvaluationStore(tmp_path / "s.sqlite"), "inprocess").evaluate(spec)
    assert again.cache_hit and again.metrics == first.metrics
    assert np.array_equal(again.samples, first.samples) and np.array_equal(again.nearest, first.nearest)
    assert first.samples.dtype == np.uint8 and len(first.nearest) == cfg.sample.num_samples
    assert set(first.versions) >= {"torch", "diffusers"}
    rows = store.rows()
    assert [r["mask"] for r in rows] == ["1010"] and rows[0]["method"] == "full" and rows[0]["seed"] == 0
    csv_path = store.export_csv(tmp_path / "table.csv")
    header = csv_path.read_text().splitlines()[0].split(",")
    assert {"canary_copy_fraction", "heldout_loss", "time_total"} <= set(header)
    proc = run_module("memrl.store", str(store.path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "1 evaluations (0 failed)" in out and "1010" in out


def test_a_failed_run_is_recorded_and_a_settings_error_is_raised_and_never_stored(ctx, tmp_path):
    from memrl.config import load_config
    from memrl.errors import ConfigError, DataError
    from memrl.task import TaskContext

    store = EvaluationStore(tmp_path / "s.sqlite")
    diverging = TaskContext.get(load_config("test", {"finetune.lr": 1e30})).spec([1, 0, 0, 0])
    result = Evaluator(store, "subprocess").evaluate(diverging)  # a run failure: recorded
    assert not result.ok and "diverged" in result.error
    assert store.get(diverging.hash).ok is False and store.rows()[0]["error"] == result.error
    missing = EvalSpec.from_config(
        load_config("test", {"data.source": str(tmp_path / "missing.npz")}), [1, 0, 0, 0], {}
    )
    conflicting = ctx.spec([1, 0, 0, 0])
    settings = {
        **conflicting.settings,
        "finetune": {**conflicting.settings["finetune"], "cuda_graph": True, "gradient_checkpointing": True},
    }
    conflicting = EvalSpec(settings, conflicting.mask, conflicting.fingerprints)
    for backend in ("inprocess", "subprocess"):
        for spec, error, message in (
            (missing, DataError, "no such .npz file"),
            (conflicting, ConfigError, "cannot both be on"),
        ):
            with pytest.raises(error, match=message):
                Evaluator(store, backend).evaluate(spec)
            assert store.get(spec.hash) is None


def test_subprocess_backend_matches_inprocess(ctx, tmp_path):
    spec = ctx.spec([0, 0, 1, 1])
    a = Evaluator(EvaluationStore(tmp_path / "a.sqlite"), "inprocess").evaluate(spec)
    b = Evaluator(EvaluationStore(tmp_path / "b.sqlite"), "subprocess").evaluate(spec)
    assert b.ok, b.error
    for key in ("heldout_loss", "canary_loss_gap", "kid", "near_copy_fraction"):
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4, abs=1e-6), key


def test_replay_without_fallback_raises_and_a_table_is_read_first(ctx, tmp_path):
    spec = ctx.spec([1, 1, 1, 1])
    with pytest.raises(NotInStoreError, match="is in none of"):
        Evaluator(EvaluationStore(tmp_path / "s.sqlite"), "replay").evaluate(spec)
    table = EvaluationStore(tmp_path / "table.sqlite")
    table.put(Evaluation(spec.hash, spec.mask, {"x": 1.0}), spec)
    found = Evaluator(
        EvaluationStore(tmp_path / "s.sqlite"),
        "replay",
        tables=[EvaluationStore(tmp_path / "table.sqlite", readonly=True)],
    ).evaluate(spec)
    assert found.cache_hit and found.metrics == {"x": 1.0}


def test_many_lookups_at_once_read_the_tables_first_then_the_store(tmp_path):
    table, store = EvaluationStore(tmp_path / "table.sqlite"), EvaluationStore(tmp_path / "s.sqlite")
    for i in range(3):
        table.put(Evaluation(f"t{i}", (1, 0), {"x": float(i)}))
    store.put(Evaluation("t0", (1, 0), {"x": 99.0}))  # shadowed by the table's row
    store.put(Evaluation("s0", (0, 1), {"x": 5.0}))
    wanted = ["s0", *(f"absent{i}" for i in range(700)), "t2", "t0", "t2"]  # > one query's 500
    assert set(store.get_many(wanted)) == {"s0", "t0"}
    found = Evaluator(store, "replay", tables=[EvaluationStore(table.path, readonly=True)]).lookup_many(
        wanted
    )
    assert len(found) == len(wanted) and all(ev is None for ev in found[1:701])
    assert [ev.metrics["x"] for ev in (found[0], *found[701:])] == [5.0, 2.0, 0.0, 2.0]
    assert all(ev.cache_hit for ev in (found[0], *found[701:]))


def _writer(path, start):
    store = EvaluationStore(path)
    for i in range(start, start + 20):
        store.put(Evaluation(f"h{i}", (1, 0), {"x": float(i)}))


def test_several_processes_write_at_once(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, s)) for s in (0, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    store = EvaluationStore(path)
    assert len(store) == 40 and store.get("h105").metrics == {"x": 105.0}


KILLED_WRITER = """
import sys
from memrl.spec import Evaluation
from memrl.store import EvaluationStore
store = EvaluationStore(sys.argv[1])
i = 0
while True:
    store.put(Evaluation(f"k{i}", (1, 0), {"x": float(i)}, samples=None))
    i += 1
"""


def test_a_killed_writer_loses_no_committed_row_and_leaves_a_sound_store(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)])

    def writer_alive() -> None:
        assert proc.poll() is None, "the writer died on its own"

    wait_until(lambda: len(EvaluationStore(path, readonly=True)) >= 20, "20 rows", writer_alive)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = EvaluationStore(path)  # opening checks the integrity
    n = len(store)
    assert n >= 20
    assert store.hashes() == {f"k{i}" for i in range(n)}  # a prefix: no gap, no partial row
    assert all(store.get(f"k{i}").metrics == {"x": float(i)} for i in (0, n - 1))


def test_reading_a_store_never_modifies_it(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path).put(Evaluation("h", (1,), {"x": 1.0}))
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=DELETE").fetchall()
    db.close()
    before = path.read_bytes()
    out = run_module("memrl.store", str(path))
    assert out.returncode == 0 and "1 evaluations" in out.stdout
    assert path.read_bytes() == before and not (tmp_path / "s.sqlite-wal").exists()
    with pytest.raises(StoreError, match="read-only"):
        EvaluationStore(path, readonly=True).put(Evaluation("g", (1,), {}))


def test_another_applications_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "app.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="another application|without memrl's evaluations table"):
            EvaluationStore(path, readonly=readonly)
    assert path.read_bytes() == before
    out = run_module("memrl.store", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and path.read_bytes() == before


def test_a_wrong_schema_and_corrupt_pages_are_found_when_opening(tmp_path):
    wrong = tmp_path / "wrong.sqlite"
    db = sqlite3.connect(wrong)
    db.execute("CREATE TABLE evaluations (spec_hash TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="lacks columns"):
        EvaluationStore(wrong)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a memrl evaluation store"):
        EvaluationStore(garbage)
    corrupt = tmp_path / "corrupt.sqlite"
    store = EvaluationStore(corrupt)
    for i in range(200):
        store.put(Evaluation(f"h{i}", (1, 0), {"x": float(i)}, error="e" * 500))
    db = sqlite3.connect(corrupt)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    db.close()
    data = bytearray(corrupt.read_bytes())
    page = 4096
    data[3 * page : 5 * page] = os.urandom(2 * page)
    corrupt.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged|not a memrl evaluation store") as err:
        EvaluationStore(corrupt)
    assert "\n" not in str(err.value)


READ_ONLY_PLACES = """
import sys
from pathlib import Path
from memrl.errors import StoreError
from memrl.spec import Evaluation
from memrl.store import EvaluationStore
folder = Path(sys.argv[1])
for target, action in ((folder / "ro" / "new.sqlite", "create"), (folder / "s.sqlite", "put")):
    try:
        EvaluationStore(target).put(Evaluation("h2", (1,), {}))
        print(action, "succeeded")
    except StoreError as exc:
        print(action, "StoreError", exc)
try:
    print("read", len(EvaluationStore(folder / "walro" / "w.sqlite", readonly=True)))
except StoreError as exc:
    print("read StoreError", exc)
"""


def test_read_only_places_are_explained(tmp_path):
    """As an ordinary user. Root ignores permissions, so under root the child runs as root without
    the capabilities that override them (the same uid, so it can still read the checkout and the
    environment wherever they live, even in a folder only root may read)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="memrl-ro-"))
    try:
        folder.chmod(0o777)
        (folder / "ro").mkdir(mode=0o555)
        (folder / "ro").chmod(0o555)
        store = EvaluationStore(folder / "s.sqlite")
        store.put(Evaluation("h", (1,), {"x": 1.0}))
        for name in ("s.sqlite", "s.sqlite-wal", "s.sqlite-shm"):
            if (folder / name).exists():
                (folder / name).chmod(0o444)
        (folder / "walro").mkdir()
        EvaluationStore(folder / "walro" / "w.sqlite").put(Evaluation("h", (1,), {"x": 1.0}))
        for p in (folder / "walro").iterdir():
            p.chmod(0o444)
        (folder / "walro").chmod(0o555)
        prefix = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: permissions cannot be tested")
            dropped = "-dac_override,-dac_read_search"
            prefix = ["setpriv", f"--bounding-set={dropped}", f"--inh-caps={dropped}"]
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", READ_ONLY_PLACES, str(folder)], capture_output=True, text=True
        )
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("create StoreError") and "writable" in lines[0]
        assert lines[1].startswith("put StoreError") and ("read-only" in lines[1] or "writable" in lines[1])
        assert lines[2].startswith("read StoreError") and "needs write access to its folder" in lines[2]
    finally:
        for p in folder.rglob("*"):
            p.chmod(0o777)
        shutil.rmtree(folder, ignore_errors=True)


def test_an_export_never_overwrites_the_store(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path).put(Evaluation("h", (1,), {"x": 1.0}))
    out = run_module("memrl.store", str(path), "--csv", str(path))
    assert out.returncode == 2 and "the store itself" in out.stderr
    assert len(EvaluationStore(path)) == 1


def test_reward_normalisation_and_pareto():
    from memrl.config import load_config

    cfg = load_config("test").reward
    refs = References(
        none={cfg.memorization: 0.0, cfg.quality: 1.0}, full={cfg.memorization: 0.2, cfg.quality: 0.5}
    )
    reward = Reward(cfg, refs)
    assert reward(refs.none) == pytest.approx(-1) and reward(refs.full) == pytest.approx(-1)
    assert reward({cfg.memorization: 0.0, cfg.quality: 0.5}) == pytest.approx(0)
    assert reward({cfg.memorization: 0.1, cfg.quality: 0.75}) == pytest.approx(-1)
    # full fine-tuning measured below the base model (no memorization induced, seed noise): a
    # higher metric still means more memorization, never less; below the base model earns nothing
    import dataclasses

    v1 = dataclasses.replace(cfg, memorization_floor=False, noise_span=0.0)
    inverted = Reward(v1, References(none=refs.full, full=refs.none))
    low, high = ({cfg.memorization: m, cfg.quality: 0.75} for m in (0.0, 0.1))
    assert inverted.terms(high)["memorization_term"] > inverted.terms(low)["memorization_term"]
    floored = Reward(cfg, References(none=refs.full, full=refs.none))
    assert floored.terms(low)["memorization_term"] == floored.terms(high)["memorization_term"] == 0.0
    assert Reward(cfg, refs).terms({cfg.memorization: -0.5, cfg.quality: 0.5})["memorization_term"] == 0.0
    # a span below 3 seed standard deviations is widened to them: noise is not amplified
    noisy = References(refs.none, refs.full, noise={cfg.memorization: 0.1})
    assert Reward(cfg, noisy).memorization_scale() == pytest.approx((0.0, 0.3))
    assert Reward(cfg, noisy).terms(refs.full)["memorization_term"] == pytest.approx(0.2 / 0.3)
    assert Reward(v1, noisy).terms(refs.full)["memorization_term"] == pytest.approx(1.0)
    # fine-tuning that harms quality (a base model that already draws the data): lower held-out
    # loss is still better, and no fine-tune scores -1, better than the reference
    harmed = Reward(cfg, References(refs.none, {**refs.full, cfg.quality: 1.5}))
    assert harmed.terms(refs.none)["quality_term"] == pytest.approx(-1.0)
    assert (
        harmed.terms({cfg.memorization: 0.0, cfg.quality: 1.2})["quality_term"]
        < harmed.terms({cfg.memorization: 0.0, cfg.quality: 1.4})["quality_term"]
    )
    quiet = References(refs.none, refs.full, noise={cfg.quality: 0.5})  # 3 x 0.5 > |1.0 - 0.5|
    assert Reward(cfg, quiet).quality_scale() == pytest.approx((0.5, 1.5))
    with pytest.raises(ValueError, match="is not a metric"):
        Reward(load_config("test", {"reward.quality": "nope"}).reward, refs)
    front = pareto_front(np.array([[0, 1], [1, 0], [1, 1], [0.5, 0.5]]))
    assert front.tolist() == [True, True, False, True]


def test_memorization_is_calibrated_by_ratio_so_easy_canaries_still_count(tmp_path):
    """Reward v3: the canaries start easy for the base model (loss 0.30 against 0.36 held out) and
    fine-tuning cuts their loss tenfold, held-out images' sixfold. The loss gap shrinks (0.06 to
    0.03), so v2 scores no memorization; the log ratio sees the canaries fall relatively more."""
    import dataclasses
    import math

    from memrl.config import load_config
    from memrl.reward import reward_version

    cfg = load_config("test").reward
    assert cfg.memorization == "canary_log_loss_ratio" and reward_version(cfg) == 4

    def ev(canary: float, held: float) -> Evaluation:  # quality: the held-out loss
        return Evaluation(
            "h", (1,), {"canary_loss": canary, "heldout_loss": held, "canary_loss_gap": held - canary}
        )

    none, full = ev(0.30, 0.36), ev(0.03, 0.06)
    assert full.metrics["canary_log_loss_ratio"] == pytest.approx(math.log(2.0))
    tuned = ev(0.05, 0.075)  # canaries 6x lower, held out 4.8x
    same_factor = ev(0.05, 0.06)  # every loss 6x lower: nothing memorized
    v3 = Reward(cfg, References(none.metrics, full.metrics))
    v2cfg = dataclasses.replace(cfg, memorization="canary_loss_gap")
    assert reward_version(v2cfg) == 2
    v2 = Reward(v2cfg, References(none.metrics, full.metrics))
    assert v2.terms(full.metrics)["memorization_term"] == v2.terms(tuned.metrics)["memorization_term"] == 0.0
    expected = math.log(0.075 / 0.05 / 1.2) / math.log(2.0 / 1.2)
    assert v3.terms(tuned.metrics)["memorization_term"] == pytest.approx(expected)
    assert 0 < expected < 1 and v3.terms(full.metrics)["memorization_term"] == pytest.approx(1.0)
    assert v3.terms(same_factor.metrics)["memorization_term"] == pytest.approx(0.0, abs=1e-12)
    # rows stored before the metric existed carry it when read back; failed rows do not
    path = tmp_path / "s.sqlite"
    store = EvaluationStore(path)
    old = Evaluation("old", (1,), {"canary_loss": 0.03, "heldout_loss": 0.06})
    del old.metrics["canary_log_loss_ratio"]
    store.put(old)
    store.put(Evaluation("bad", (1,), {}, ok=False, error="diverged"))
    assert EvaluationStore(path).get("old").metrics["canary_log_loss_ratio"] == pytest.approx(math.log(2.0))
    assert EvaluationStore(path).get("bad").metrics == {}
    flat = {r["spec_hash"]: r for r in EvaluationStore(path).rows()}  # the reports' and CSV's view
    assert flat["old"]["canary_log_loss_ratio"] == pytest.approx(math.log(2.0))
    assert "canary_log_loss_ratio" not in flat["bad"]


def test_csv_naming_a_directory_is_explained(tmp_path):

    from memrl.tables import shipped_dir

    proc = run_module("memrl.store", str(shipped_dir() / "bench.sqlite"), "--csv", str(tmp_path))
    assert (
        proc.returncode == 2
        and "is a directory; name a file" in proc.stderr
        and "Traceback" not in proc.stderr
    )
