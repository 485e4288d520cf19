"""Checkpointed evaluations: one fine-tune, its curve of metrics, stored with the evaluation."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest

from memrl.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override,message",
    [
        ({"finetune.checkpoint_every": 2}, r"finetune\.checkpoint_every=2 must be a positive divisor of "),
        ({"finetune.checkpoint_every": 0}, r"checkpoint_every=0 must be a positive divisor"),
        ({"finetune.sample_at": [1]}, r"finetune\.sample_at needs finetune\.checkpoint_every"),
        (
            {"finetune.checkpoint_every": 1, "finetune.sample_at": [4]},
            r"finetune\.sample_at=\[4\]: 4 is not a checkpoint",
        ),
    ],
)
def test_a_bad_curve_setting_is_named_with_its_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("test", override)  # finetune.steps is 3


def test_the_last_point_of_a_curve_is_the_plain_evaluation(ctx):
    """A curve is measured inside the one fine-tune, without changing it: its final metrics are a
    plain evaluation's, every checkpoint holds the loss-based metrics, the ``sample_at`` ones every
    metric, and the gradient shares cover exactly the trained groups."""
    from memrl.context import TaskContext
    from memrl.scoring import evaluate_spec

    mask = np.array([1, 0, 1, 0])
    plain = evaluate_spec(ctx.spec(mask))
    curved_ctx = TaskContext.get(
        load_config(ctx.cfg, {"finetune.checkpoint_every": 1, "finetune.sample_at": [2]})
    )
    curved = evaluate_spec(curved_ctx.spec(mask))
    assert curved_ctx.spec(mask).hash != ctx.spec(mask).hash  # the spec says it is a curve
    assert plain.curve is None
    steps = [p["step"] for p in curved.curve]
    assert steps == [1, 2, 3]
    for key, value in plain.metrics.items():
        same = curved.metrics[key] == value or (math.isnan(value) and math.isnan(curved.metrics[key]))
        assert same, key
    assert {k: v for k, v in curved.curve[-1].items() if k not in ("step", "grad_share")} == curved.metrics
    assert "kid" in curved.curve[1] and "kid" not in curved.curve[0]
    assert "heldout_loss" in curved.curve[0] and "mia_auc_noncanary" in curved.curve[0]
    for point in curved.curve:
        share = point["grad_share"]
        assert sum(share) == pytest.approx(1.0) and share[1] == share[3] == 0.0
    assert curved.curve[0]["heldout_loss"] != curved.curve[-1]["heldout_loss"]


def test_a_curve_survives_the_store_and_old_stores_still_read(ctx, tmp_path):
    from memrl.spec import Evaluation
    from memrl.store import EvaluationStore

    store = EvaluationStore(tmp_path / "s.sqlite")
    ev = Evaluation("h1", (1, 0), {"heldout_loss": 0.5}, curve=[{"step": 1, "heldout_loss": 0.6}])
    store.put(ev)
    assert store.get("h1").curve == [{"step": 1, "heldout_loss": 0.6}]
    # a store written before curves existed: read as it is, and it gains the column when writable
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:
        db.execute(
            "CREATE TABLE evaluations (spec_hash TEXT PRIMARY KEY, mask TEXT NOT NULL, ok INTEGER NOT "
            "NULL, error TEXT, metrics TEXT NOT NULL, timings TEXT NOT NULL, versions TEXT NOT NULL, "
            "samples BLOB, spec TEXT, created REAL)"
        )
        db.execute("INSERT INTO evaluations VALUES ('h0', '[1]', 1, NULL, '{}', '{}', '{}', NULL, NULL, 0)")
    assert EvaluationStore(old, readonly=True).get("h0").curve is None
    EvaluationStore(old).put(ev)
    assert EvaluationStore(old, readonly=True).get("h1").curve == ev.curve


def test_curve_masks_are_every_single_group_the_ones_and_the_150_step_portfolio():
    """CURVE_MASKS recomputed: the greedy portfolio's first 4 masks at each preference on the
    shipped 150-step table's training tasks, with the mask of ones and every single group."""
    from memrl.table import load_table
    from memrl.tables import CURVE_MASKS, CURVE_NOISE_MASKS
    from research.benchmark.methods import searched

    table = load_table(load_config("bench"))
    train = [i for i in range(len(table.names)) if not table.heldout[i]]
    picked = {
        "".join(map(str, table.masks[i]))
        for w in (0.25, 0.5, 0.75)
        for i in searched("portfolio", table, train, train[0], w, 4)
    }
    singles = {"".join("1" if i == j else "0" for i in range(7)) for j in range(7)}
    assert (
        set(CURVE_MASKS) == picked | singles | {"1111111"} and len(CURVE_MASKS) == len(set(CURVE_MASKS)) == 16
    )
    assert set(CURVE_NOISE_MASKS) <= set(CURVE_MASKS)


def test_a_curve_table_replays_every_stored_point_on_fixed_references(tmp_path):
    """A tiny curve suite built in process: every (mask, steps) point reads back from the table,
    its reward is on the plain references, and what is not in the table is named."""
    from memrl.curves import FULL, load_curves
    from memrl.errors import StoreError
    from memrl.evaluator import make_evaluator
    from memrl.reward import Reward
    from memrl.tables import REFERENCE_STEPS, curve_jobs

    cfg = load_config(
        "test",
        {
            "finetune.checkpoint_every": 1,
            "finetune.sample_at": [2],
            "env.tasks": [{"name": "tiny", "seed": 3}],
            "env.store": str(tmp_path / "curves.sqlite"),
        },
    )
    jobs = curve_jobs(cfg)
    assert [j.kind for j in jobs].count("reference") == 2 and [j.kind for j in jobs].count("noise") == 6
    evaluator = make_evaluator(cfg)
    stored = {j.spec.hash: ev for j, ev in zip(jobs, evaluator.evaluate_many([j.spec for j in jobs]))}
    table = load_curves(cfg)
    assert table.masks[-1] == FULL and list(table.steps) == [1, 2, 3] and table.complete().all()
    ones = next(j for j in jobs if j.kind == "main" and j.spec.mask == (1, 1, 1, 1))
    point = stored[ones.spec.hash].curve[1]
    assert table.metric("heldout_loss", "tiny", "1111", 2) == point["heldout_loss"]
    assert table.metric("kid", "tiny", "1111", 2) == point["kid"]  # sampled at step 2
    assert np.isnan(table.metric("kid", "tiny", "1111", 1))  # not sampled at step 1
    assert not np.isnan(table.metric("heldout_loss", "tiny", FULL, 3, seed=2))
    reference = next(j for j in jobs if j.kind == "reference" and j.spec.mask == (1, 1, 1, 1))
    assert reference.spec.settings["finetune"]["steps"] == REFERENCE_STEPS
    refs = table.references[0]
    expected = Reward(cfg.reward, refs).terms(point)
    got = table.terms(cfg.reward, 0)[table.masks.index("1111"), 0, 1]
    assert got[0] == pytest.approx(expected["memorization_term"]) and got[1] == pytest.approx(
        expected["quality_term"]
    )
    # the reward's ratio is derived at every checkpoint, sampled or not (step 1 is not)
    assert np.isfinite(table.rewards(cfg.reward, 0, 0.5)[:, 0, :]).all()
    shares = table.grad_share[0, table.masks.index("1000"), 0, 0]
    assert shares[0] == pytest.approx(1.0) and shares[1:].sum() == 0
    premise = _bench_module("premise")
    rows = premise.premise_rows(table, cfg.reward, at=2)
    best = {r["method"]: r["regret"] for r in rows if r["memorization_weight"] == 0.5}
    assert best["any"] == 0.0 and best["any"] <= min(best["masks@150"], best["ones@any"])
    regret = premise.recipe_regret(table, cfg.reward, 0, 0.5)
    assert best["ones@any"] == pytest.approx(float(np.min(regret[table.masks.index("1111")])))
    groups = [i for i, m in enumerate(table.masks) if m != FULL]
    assert best["masks@first"] == pytest.approx(float(np.min(regret[groups, 0])))  # shortest fine-tune
    refs = table.references[0]
    as_base = Reward(cfg.reward, refs).terms(refs.none)  # the base model's own metrics as a recipe
    value = -(0.5 * as_base["memorization_term"] + 0.5 * as_base["quality_term"])
    rewards = table.rewards(cfg.reward, 0, 0.5)[groups, 0, :]
    expected = (rewards.max() - value) / (rewards.max() - rewards.min())
    assert premise.base_regret(table, cfg.reward, 0, 0.5) == pytest.approx(expected)
    assert "Fine-tune noise: 1 of 1 tasks have noise-seed rows (tiny)" in premise.noise_line(table)
    table.values["heldout_loss"][:, :, 1:] = np.nan  # no noise seeds: the intervals say so
    assert "no task has noise-seed rows yet" in premise.noise_line(table)
    square = np.array([[0.5, 0.5], [1.0, 0.0], [2.0, 2.0]])
    assert premise.hypervolume(square) == pytest.approx(1.0 * 1.0 + 0.5 * 0.5)
    with pytest.raises(StoreError, match="steps=5 is not a checkpoint"):
        table.index("tiny", "1111", 5)
    with pytest.raises(StoreError, match="mask '0110' is not in this curve table"):
        table.index("tiny", "0110", 1)


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_curve_table_of_another_spec_version_is_named(tmp_path):
    from memrl.curves import load_curves
    from memrl.errors import StoreError
    from memrl.spec import SPEC_VERSION
    from memrl.store import EvaluationStore

    table = tmp_path / "old.sqlite"
    EvaluationStore(table).set_note("provenance", {"memrl_spec_version": SPEC_VERSION - 1})
    cfg = load_config("test", {"finetune.checkpoint_every": 1, "env.table": str(table)})
    with pytest.raises(StoreError, match=f"a curve table of spec version {SPEC_VERSION - 1}"):
        load_curves(cfg)
    with pytest.raises(StoreError, match="records no curves"):
        load_curves(load_config("test"))


def test_the_shipped_curve_table_rows_rehash_and_read_back():
    """Rows of memrl/assets/tables/bench3.sqlite (built across sessions) are keyed exactly as this
    memrl keys them, on the fingerprints this machine computes, and carry whole curves."""
    import json as _json

    from memrl.context import TaskContext
    from memrl.spec import EvalSpec
    from memrl.store import EvaluationStore
    from memrl.tables import shipped_dir

    path = shipped_dir() / "bench3.sqlite"
    if not path.is_file():
        pytest.skip("no curve table shipped yet")
    rows = EvaluationStore(path, readonly=True)
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        sample = db.execute(
            "SELECT spec_hash, spec, curve FROM evaluations ORDER BY spec_hash LIMIT 4"
        ).fetchall()
    assert sample and "provenance" in rows.notes()
    for spec_hash, text, curve in sample:
        spec = EvalSpec.from_json(text)
        assert spec.hash == spec_hash
        assert TaskContext.get(spec.to_config()).fingerprints == spec.fingerprints
        if spec.settings["finetune"].get("checkpoint_every"):
            points = _json.loads(curve)
            assert [p["step"] for p in points] == list(range(25, 401, 25))


def test_every_tasks_seed_0_curves_are_built_before_any_noise_row():
    from memrl.tables import curve_jobs

    cfg = load_config(
        "test",
        {
            "finetune.checkpoint_every": 1,
            "env.tasks": [{"name": "tiny", "seed": 3}, {"name": "other", "seed": 4}],
        },
    )
    kinds = [(j.task, j.kind) for j in curve_jobs(cfg)]
    last_main = max(i for i, (_, kind) in enumerate(kinds) if kind != "noise")
    first_noise = min(i for i, (_, kind) in enumerate(kinds) if kind == "noise")
    assert last_main < first_noise and kinds[last_main][0] == "other" and kinds[first_noise][0] == "tiny"
    from memrl.context import suite
    from memrl.errors import ConfigError
    from memrl.tables import build_order

    jobs = build_order(curve_jobs(cfg), ["other"], suite(cfg))  # tables build --first other
    order = [(j.task, j.kind) for j in jobs]
    n = sum(1 for t, k in kinds if t == "other" and k != "noise")
    assert all(t == "other" and k != "noise" for t, k in order[:n]) and order[n:] == [
        x for x in kinds if not (x[0] == "other" and x[1] != "noise")
    ]
    with pytest.raises(ConfigError, match="--first elsewhere: no such task .* tiny, other"):
        build_order(curve_jobs(cfg), ["elsewhere"], suite(cfg))
    jobs = build_order(curve_jobs(cfg), ["other"], suite(cfg), ["other"])  # and --noise-first other
    order = [(j.task, j.kind) for j in jobs]
    m = sum(1 for t, k in kinds if t == "other" and k == "noise")
    assert order[:n] == [x for x in kinds if x[0] == "other" and x[1] != "noise"]
    assert order[n : n + m] == [x for x in kinds if x == ("other", "noise")]  # its noise rows next
    assert ("tiny", "noise") not in order[: n + m]
    with pytest.raises(ConfigError, match="--noise-first elsewhere: no such task"):
        build_order(curve_jobs(cfg), [], suite(cfg), ["elsewhere"])
