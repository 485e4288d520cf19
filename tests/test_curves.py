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
    from memrl.benchmark.methods import portfolio
    from memrl.benchmark.table import load_table
    from memrl.tables import CURVE_MASKS, CURVE_NOISE_MASKS

    table = load_table(load_config("bench"))
    train = [i for i in range(len(table.names)) if not table.heldout[i]]
    picked = {
        "".join(map(str, table.masks[i])) for w in (0.25, 0.5, 0.75) for i in portfolio(table, train, w, 4)
    }
    singles = {"".join("1" if i == j else "0" for i in range(7)) for j in range(7)}
    assert (
        set(CURVE_MASKS) == picked | singles | {"1111111"} and len(CURVE_MASKS) == len(set(CURVE_MASKS)) == 16
    )
    assert set(CURVE_NOISE_MASKS) <= set(CURVE_MASKS)
