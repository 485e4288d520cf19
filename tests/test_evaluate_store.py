import multiprocessing as mp
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from memrl.config import load_config
from memrl.evaluate import EvalSpec, Evaluation, Evaluator, NotInStoreError
from memrl.reward import References, Reward, pareto_front
from memrl.store import EvaluationStore


def _spec(cfg, ctx, mask):
    return EvalSpec.from_config(cfg, mask, ctx.fingerprints)


def test_spec_hash_depends_on_every_input(cfg, ctx):
    base = _spec(cfg, ctx, [1, 0, 0, 0])
    assert base.hash == _spec(load_config("test"), ctx, [1, 0, 0, 0]).hash
    assert base.hash != _spec(cfg, ctx, [0, 1, 0, 0]).hash
    assert base.hash != _spec(load_config("test", {"finetune.seed": 1}), ctx, [1, 0, 0, 0]).hash
    assert base.hash != EvalSpec.from_config(cfg, [1, 0, 0, 0], {**ctx.fingerprints, "data": "x"}).hash
    assert EvalSpec.from_json(base.to_json()) == base


def test_evaluation_round_trips_through_the_store(cfg, ctx, tmp_path):
    store = EvaluationStore(tmp_path / "s.sqlite")
    ev = Evaluator(store, "inprocess")
    spec = _spec(cfg, ctx, [1, 0, 1, 0])
    first = ev.evaluate(spec)
    assert first.ok and not first.cache_hit and ev.misses == 1
    again = ev.evaluate(spec)
    assert again.cache_hit and ev.hits == 1
    assert again.metrics == first.metrics
    assert np.array_equal(again.samples, first.samples)
    assert first.samples.dtype == np.uint8 and len(first.nearest) == cfg.sample.num_samples
    assert set(first.versions) >= {"torch", "diffusers"}
    rows = store.rows()
    assert rows[0]["mask"] == "1010" and rows[0]["method"] == "full"
    csv_path = store.export_csv(tmp_path / "table.csv")
    assert "canary_copy_fraction" in csv_path.read_text().splitlines()[0]
    out = subprocess.run(
        [sys.executable, "-m", "memrl.store", str(store.path)], capture_output=True, text=True, check=True
    ).stdout
    assert "1 evaluations (0 failed)" in out and "1010" in out


def test_a_failed_evaluation_is_recorded_not_raised(cfg, ctx, tmp_path):
    store = EvaluationStore(tmp_path / "s.sqlite")
    bad = load_config("test", {"data.source": str(tmp_path / "missing.npz")})
    spec = EvalSpec.from_config(bad, [1, 0, 0, 0], {})
    result = Evaluator(store, "subprocess").evaluate(spec)
    assert not result.ok and "missing.npz" in result.error
    assert store.get(spec.hash).ok is False


def test_subprocess_backend_matches_inprocess(cfg, ctx, tmp_path):
    spec = _spec(cfg, ctx, [0, 0, 1, 1])
    a = Evaluator(EvaluationStore(tmp_path / "a.sqlite"), "inprocess").evaluate(spec)
    b = Evaluator(EvaluationStore(tmp_path / "b.sqlite"), "subprocess").evaluate(spec)
    assert b.ok, b.error
    for key in ("heldout_loss", "canary_loss_gap", "kid", "near_copy_fraction"):
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4, abs=1e-6), key


def test_replay_without_fallback_raises(cfg, ctx, tmp_path):
    with pytest.raises(NotInStoreError, match="not in the store"):
        Evaluator(EvaluationStore(tmp_path / "s.sqlite"), "replay").evaluate(_spec(cfg, ctx, [1, 1, 1, 1]))


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
    assert len(EvaluationStore(path)) == 40


def test_a_corrupt_store_is_explained(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a memrl evaluation store"):
        EvaluationStore(path)


def test_a_killed_writer_leaves_no_partial_row(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path)
    code = (
        f"import sqlite3, os; db = sqlite3.connect({str(path)!r}); db.execute('BEGIN'); "
        'db.execute("INSERT INTO evaluations (spec_hash, mask, ok, metrics, timings, versions) '
        "VALUES ('half', '[1]', 1, '{}', '{}', '{}')\"); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert "half" not in EvaluationStore(path)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_reward_normalisation_and_pareto():
    cfg = load_config("test").reward
    refs = References(
        none={cfg.memorization: 0.0, cfg.quality: 1.0}, full={cfg.memorization: 0.2, cfg.quality: 0.5}
    )
    reward = Reward(cfg, refs)
    assert reward(refs.none) == pytest.approx(-1) and reward(refs.full) == pytest.approx(-1)
    assert reward({cfg.memorization: 0.0, cfg.quality: 0.5}) == pytest.approx(0)
    assert reward({cfg.memorization: 0.1, cfg.quality: 0.75}) == pytest.approx(-1)
    with pytest.raises(ValueError, match="is not a metric"):
        Reward(load_config("test", {"reward.quality": "nope"}).reward, refs)
    front = pareto_front(np.array([[0, 1], [1, 0], [1, 1], [0.5, 0.5]]))
    assert front.tolist() == [True, True, False, True]
