"""MemControl-Bench tables: build (resumable, parallel), export, replay, and the shipped table's keys."""

import itertools
import json
import sqlite3

import gymnasium as gym
import numpy as np
import pytest

import memrl  # noqa: F401  (registers MemControl-v0)
from memrl.config import load_config
from memrl.errors import NotInStoreError
from memrl.store import EvaluationStore
from memrl.tables import build, export, import_rows, jobs, noise_masks, rekey, shipped_dir
from memrl.testing import run_module

ROWS = 2 * 16 + 2 + 2 * 4
"""Rows of the tiny table: 16 masks and full fine-tuning on each of two tasks, 8 noise rows."""
TASKS = [
    {"name": "digits-a", "seed": 1},
    {"name": "faces", "source": "faces", "seed": 2, "heldout": True, "noise_masks": 4},
]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A complete tiny table: every mask of the test space and full fine-tuning on two tasks,
    plus a noise sample."""
    folder = tmp_path_factory.mktemp("tables")
    cfg = load_config("test", {"env.tasks": TASKS})
    assert build(cfg, folder / "work.sqlite", workers=2, threads=1) == ROWS
    return export(folder / "work.sqlite", folder / "tiny.sqlite", "tiny"), cfg


def test_jobs_cover_every_mask_of_every_task_once(cfg):
    suite_cfg = load_config(cfg, {"env.tasks": TASKS})
    all_jobs = jobs(suite_cfg)
    main = [j for j in all_jobs if j.kind == "main"]
    assert {(j.task, j.spec.mask) for j in main} == {
        (t["name"], m) for t in TASKS for m in itertools.product((0, 1), repeat=4)
    }
    assert [j.spec.mask for j in main[:2]] == [(0,) * 4, (1,) * 4]  # task by task, references first
    order = [t["name"] for t in TASKS]
    assert [j.task for j in all_jobs] == sorted((j.task for j in all_jobs), key=order.index)
    full = [j for j in all_jobs if j.kind == "full"]
    assert [(j.task, j.spec.settings["search"]["granularity"]) for j in full] == [
        (t["name"], "block") for t in TASKS
    ]
    noise = [j for j in all_jobs if j.kind == "noise"]
    assert len(noise) == 8 and {j.spec.settings["finetune"]["seed"] for j in noise} == {1, 2}
    assert len({j.spec.hash for j in all_jobs}) == len(all_jobs)
    assert noise_masks(7)[:2] == [(0,) * 7, (1,) * 7] and len(set(noise_masks(7))) == 16


def test_the_exported_table_has_rows_descriptors_provenance_and_no_samples(table):
    path, _ = table
    store = EvaluationStore(path, readonly=True)
    assert len(store) == ROWS
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations WHERE samples IS NOT NULL").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM descriptors").fetchone()[0] == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    provenance = store.notes()["provenance"]
    assert provenance["rows"] == ROWS and provenance["failed"] == 0 and provenance["memrl_spec_version"] == 2
    assert (
        isinstance(provenance["seconds_per_evaluation_median"], float) and "torch" in provenance["versions"]
    )


def test_a_build_resumes_and_a_table_seeds_a_new_working_store(table, tmp_path, monkeypatch):
    from memrl import encoders
    from memrl.context import TaskContext

    path, cfg = table
    assert import_rows(tmp_path / "work.sqlite", path) == ROWS
    monkeypatch.setattr(TaskContext, "_cache", {})  # as in a new process
    asked, get_encoder = [], encoders.get_encoder
    monkeypatch.setattr(encoders, "get_encoder", lambda *a: asked.append(a) or get_encoder(*a))
    assert build(cfg, tmp_path / "work.sqlite", workers=1, threads=1) == 0
    assert asked == []  # the tasks are complete: no encoder is needed, none is trained
    proc = run_module("memrl.store", str(path), "--csv", str(tmp_path / "t.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"{ROWS} evaluations (0 failed)" in out and "provenance" in out
    assert len((tmp_path / "t.csv").read_text().splitlines()) == ROWS + 1


def test_replay_over_the_table_matches_live_evaluation_and_checkers_pass(table, tmp_path):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    path, cfg = table
    replay = {
        "env.tasks": TASKS,
        "env.backend": "replay",
        "env.table": str(path),
        "env.store": str(tmp_path / "empty.sqlite"),
    }
    env = gym.make("MemControl-v0", config="test", overrides=replay)
    _, info = env.reset(seed=0, options={"dataset": "faces"})
    _, reward, *_, step_info = env.step(np.array([0, 1, 1, 0], dtype=np.int8))
    assert env.unwrapped.diagnostics["cache_hit"] and len(EvaluationStore(tmp_path / "empty.sqlite")) == 0
    live = gym.make(
        "MemControl-v0",
        config="test",
        overrides={"env.tasks": TASKS, "env.store": str(tmp_path / "l.sqlite")},
    )
    live.reset(seed=0, options={"dataset": "faces"})
    _, live_reward, *_, live_info = live.step(np.array([0, 1, 1, 0], dtype=np.int8))
    # the table's workers ran single-threaded: another thread count sums floats in another order
    assert live_reward == pytest.approx(reward, abs=1e-4)
    assert live_info["metrics"]["heldout_loss"] == pytest.approx(
        step_info["metrics"]["heldout_loss"], rel=1e-4
    )
    gym_check(gym.make("MemControl-v0", config="test", overrides=replay).unwrapped)
    sb3_check(gym.make("MemControl-v0", config="test", overrides=replay).unwrapped, warn=False)


def test_a_mask_the_table_lacks_fails_clearly_or_falls_back_to_a_live_evaluation(table, tmp_path):
    path, _ = table
    other = {
        "env.tasks": [{"name": "new", "seed": 9}],
        "env.backend": "replay",
        "env.table": str(path),
        "env.store": str(tmp_path / "s.sqlite"),
    }
    env = gym.make("MemControl-v0", config="test", overrides=other)
    with pytest.raises(NotInStoreError, match="no training task of env.tasks has a complete table"):
        env.reset(seed=0)  # replay draws only tasks the table completes
    env.reset(seed=0, options={"dataset": "new"})  # asked for by name: served as far as it goes
    with pytest.raises(NotInStoreError, match="env.replay_fallback=true"):
        env.step(np.array([1, 0, 0, 0], dtype=np.int8))
    env = gym.make("MemControl-v0", config="test", overrides={**other, "env.replay_fallback": True})
    env.reset(seed=0)
    assert env.step(np.array([1, 0, 0, 0], dtype=np.int8))[4]["ok"]
    assert len(EvaluationStore(tmp_path / "s.sqlite")) == 3  # two references and the mask


def test_shipped_rows_still_hash_to_what_the_current_code_computes():
    """A change to what keys an evaluation (settings, fingerprints, hashing) fails here instead of
    silently orphaning the shipped table."""
    from memrl.task import TaskContext, suite

    path = shipped_dir() / "bench.sqlite"
    if not path.is_file():
        pytest.skip("no shipped bench table yet")
    store = EvaluationStore(path, readonly=True)
    hashes = store.hashes()
    rng = np.random.default_rng(0)
    checked = 0
    for entry in suite(load_config("bench")):
        ctx = TaskContext.get(entry.cfg)
        masks = [(0,) * ctx.space.k, (1,) * ctx.space.k]
        masks += [tuple(int(b) for b in rng.integers(0, 2, ctx.space.k)) for _ in range(3)]
        specs = [ctx.spec(m) for m in masks]
        present = [s for s in specs if s.hash in hashes]
        checked += len(present)
        for spec in present:
            stored = json.loads(
                sqlite3.connect(path)
                .execute("SELECT spec FROM evaluations WHERE spec_hash = ?", (spec.hash,))
                .fetchone()[0]
            )
            assert stored["fingerprints"] == spec.fingerprints and tuple(stored["mask"]) == spec.mask
    assert checked >= 2, "the shipped table holds none of the sampled rows: its keys changed"


def test_every_shipped_row_is_keyed_by_the_data_fingerprint_this_machine_computes():
    """No shipped task is orphaned on this CPU (on AVX2 machines histology's and retina's rows,
    built on AVX-512 ones, once were)."""
    from memrl.data import load_splits

    path = shipped_dir() / "bench.sqlite"
    if not path.is_file():
        pytest.skip("no shipped bench table yet")
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        stored = {
            (json.dumps(s["settings"]["data"], sort_keys=True), s["fingerprints"]["data"])
            for s in (json.loads(t) for (t,) in db.execute("SELECT spec FROM evaluations"))
        }
    wrong = [
        (data, fp)
        for data, fp in stored
        if load_splits(load_config({"data": json.loads(data)}).data).fingerprint != fp
    ]
    assert not wrong, f"{len(wrong)} data settings keyed by another fingerprint, e.g. {wrong[0]}"


def test_rekey_finds_rows_keyed_by_an_older_data_fingerprint_again(table, tmp_path):
    """Rows (and descriptors) keyed by a stale data fingerprint get the current one; a current row
    is left alone, so a second run moves nothing."""
    from memrl.descriptor import DESCRIPTOR_VERSION
    from memrl.spec import EvalSpec
    from memrl.utils import stable_hash

    path, _ = table
    stale = tmp_path / "stale.sqlite"
    stale.write_bytes(path.read_bytes())
    current = EvaluationStore(path, readonly=True).hashes()
    with sqlite3.connect(stale) as db:
        keys = {k for (k,) in db.execute("SELECT key FROM descriptors")}
        for h, text in db.execute("SELECT spec_hash, spec FROM evaluations").fetchall():
            spec = EvalSpec.from_json(text)
            older = {**spec.fingerprints, "data": stable_hash(["older", spec.fingerprints["data"]])}
            old = EvalSpec(spec.settings, spec.mask, older, spec.version)
            db.execute(
                "UPDATE evaluations SET spec_hash = ?, spec = ? WHERE spec_hash = ?",
                (old.hash, old.to_json(), h),
            )
            new_key = stable_hash([spec.fingerprints, DESCRIPTOR_VERSION])
            old_key = stable_hash([old.fingerprints, DESCRIPTOR_VERSION])
            db.execute("UPDATE descriptors SET key = ? WHERE key = ?", (old_key, new_key))
    assert EvaluationStore(stale, readonly=True).hashes().isdisjoint(current)
    assert rekey(stale) == ROWS
    assert EvaluationStore(stale, readonly=True).hashes() == current
    with sqlite3.connect(stale) as db:
        assert {k for (k,) in db.execute("SELECT key FROM descriptors")} == keys
    assert rekey(stale) == 0


def test_the_transfer_benchmark_runs_every_method_on_the_tables(table, tmp_path):
    from memrl.agents.policy import load_policy

    from research.benchmark import PREFERENCES, iqm, load_table, modes, ship, summarise, transfer, write_rows

    path, cfg = table
    bench_cfg = load_config(
        cfg,
        {
            "env.backend": "replay",
            "env.table": str(path),
            "env.store": str(tmp_path / "s.sqlite"),
            "ppo.n_steps": 16,
            "ppo.batch_size": 8,
        },
    )
    dense = load_table(bench_cfg)
    assert dense.terms.shape == (2, 16, 3) and np.isfinite(dense.terms).all()
    regret = dense.regret(0.5)
    assert np.allclose(regret.min(axis=1), 0) and np.allclose(regret.max(axis=1), 1)
    rows = transfer(bench_cfg, seeds=1, episodes=32, budgets=(4, 16), search_episodes=4)
    counts = {}
    for r in rows:
        counts.setdefault(r["method"], set()).add(r["fine_tunes"])
    assert counts == {
        **{m: {1, 2, 3, 4} for m in ("ppo", "nearest-task", "knn-tasks", "regression")},
        **{m: {1} for m in ("ppo-no-descriptor", "gradient-top-g", "single-best")},
        "single-best (mean reward)": {1},
        **{
            f"preset: {p}": {1}
            for p in ("down-blocks attention", "mid-block attention", "up-blocks attention", "all attention")
        },
        **{m: {4, 16} for m in ("portfolio", "random", "tpe", "tpe-warm", "gp", "gp-prior")},  # every budget
        **{m: {4, 16} for m in ("ppo-search", "ppo-search-no-descriptor", "ppo-search-no-history")},
    }
    assert {r["task"] for r in rows} == {"faces"}  # the only task with another one to train on
    assert len(rows) == sum(len(n) for n in counts.values()) * len(PREFERENCES)
    by = {(r["method"], r["memorization_weight"], r["fine_tunes"]): r for r in rows}
    for w in PREFERENCES:
        assert by[("preset: all attention", w, 1)]["mask"] == "1111"
        assert by[("random", w, 16)]["regret"] == pytest.approx(0.0)  # 16 fine-tunes see every mask
        assert 0 <= by[("ppo", w, 4)]["regret"] <= by[("ppo", w, 1)]["regret"] + 1e-9
        assert by[("nearest-task", w, 1)]["mask"] == by[("tpe-warm", w, 4)]["mask"]  # enqueued first
        assert by[("ppo-search", w, 16)]["regret"] == pytest.approx(0.0)  # 16 distinct masks: all of K=4
    assert iqm(np.array([0.0, 1.0, 1.0, 100.0])) == 1.0
    assert "| ppo | " in summarise(rows)
    write_rows(rows, tmp_path / "transfer.csv")
    searcher = load_config(bench_cfg, {"env.mode": "search", "env.budget": 2})  # what memrl ships
    from memrl.errors import MemrlError

    with pytest.raises(MemrlError, match="no transfer.csv here"):  # checked before any training
        ship(searcher, tmp_path / "ship", tmp_path / "elsewhere")
    with pytest.raises(MemrlError, match="exists and is not a folder"):
        ship(searcher, tmp_path / "transfer.csv", tmp_path)
    shipped = load_policy(ship(searcher, tmp_path / "ship", tmp_path))
    assert [t["name"] for t in shipped.card["training_tasks"]] == ["digits-a"]
    first = [r["regret"] for r in rows if r["method"] == "ppo" and r["fine_tunes"] == 1]
    assert shipped.card["benchmark"]["ppo"]["heldout"]["mean_regret"] == pytest.approx(
        np.mean(first), abs=1e-4
    )
    at16 = [r["regret"] for r in rows if r["method"] == "ppo-search" and r["fine_tunes"] == 16]
    by_budget = shipped.card["benchmark"]["ppo-search"]["heldout"]["mean_regret_by_fine_tunes"]
    assert list(by_budget) == ["4", "16"] and by_budget["16"] == pytest.approx(np.mean(at16), abs=1e-4)
    assert shipped.prior is not None and shipped.prior.names == ["digits-a"]  # ships its prior
    assert (
        shipped.card["config"]["env"]["store"] is None and shipped.card["preference"]["sampling"] == "uniform"
    )
    compared = modes(bench_cfg, seeds=1, episodes=(8, 32))
    assert {(r["method"], r["episodes"]) for r in compared} == {
        (f"ppo-{mode}", n) for mode in ("mask", "sequential") for n in (8, 32)
    }
    assert all(np.isfinite(r["regret"]) and r["regret"] >= 0 for r in compared)  # >1: worse than all groups


def test_a_benchmark_command_records_its_run_beside_its_results(table, tmp_path):
    import yaml

    from research.benchmark import load_table
    from research.benchmark.cli import main
    from research.benchmark.experiments import RESULTS_VERSION

    path, cfg = table
    bench_cfg = load_config(
        cfg, {"env.backend": "replay", "env.table": str(path), "env.store": str(tmp_path / "s.sqlite")}
    )
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench_cfg.to_dict()))
    argv = ["findings", "--config", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert record["command"] == "python -m research.benchmark " + " ".join(argv) and record["seeds"] == []
    assert record["config_hash"] == bench_cfg.hash() and record["config"]["env"]["table"] == str(path)
    dense = load_table(bench_cfg)
    assert record["table"] == {"tasks": dense.names, "digest": dense.digest([0, 1])}
    assert record["results_version"] == RESULTS_VERSION and "torch" in record["versions"]


def test_the_paper_claims_compare_full_fine_tuning_presets_and_searched_masks(table, tmp_path):
    from research.benchmark import claims, findings, load_table

    path, cfg = table
    bench_cfg = load_config(
        cfg, {"env.backend": "replay", "env.table": str(path), "env.store": str(tmp_path / "s.sqlite")}
    )
    rows, text = claims(bench_cfg, tmp_path / "claims.png")
    dense = load_table(bench_cfg)
    for t, task in enumerate(dense.names):
        mine = {r["mask_kind"]: r for r in rows if r["task"] == task}
        assert mine["all attention"]["mask"] == "1111" and mine["no fine-tune"]["mask"] == "0000"
        assert len(mine["full fine-tune (every parameter)"]["mask"]) > 4  # block granularity
        best = "".join(map(str, dense.masks[int(np.argmin(dense.regret(0.5)[t]))]))
        assert mine["searched (best at w=0.5)"]["mask"] == best
        assert any(r["on_pareto_front"] for r in mine.values())
    assert "of 2 here" in text and (tmp_path / "claims.png").read_bytes()[:4] == b"\x89PNG"
    summary = findings(bench_cfg)
    assert "Complete tasks: 2 of 2." in summary and "| faces | heldout_loss |" in summary
    assert "| digits-a | heldout_loss |" not in summary  # no noise sample for it


def test_tune_scores_settings_on_training_tasks_only_and_untrained_search_is_gp_prior(
    table, tmp_path, monkeypatch
):
    from memrl.errors import ConfigError
    from memrl.searchers.transfer import regression_model
    from research.benchmark import load_table
    from research.benchmark.experiments import TUNE_BUDGETS, TUNE_GRIDS, chosen_setting, tune
    from research.benchmark.methods import prior_of, searched

    path, cfg = table
    overrides = {"env.backend": "replay", "env.table": str(path), "env.store": str(tmp_path / "s.sqlite")}
    bench_cfg = load_config(cfg, {**overrides, "ppo.n_steps": 16, "ppo.batch_size": 8, "env.budget": 4})
    with pytest.raises(ConfigError, match="1 complete training task"):
        tune(bench_cfg, seeds=1)  # faces is held out: one training task, nothing to train on
    with pytest.raises(ConfigError, match="'sac' is not one of"):
        tune(bench_cfg, seeds=1, method="sac")
    both = load_config(bench_cfg, {"env.tasks": [TASKS[0], {**TASKS[1], "heldout": False}]})
    dense = load_table(both)
    monkeypatch.setitem(TUNE_GRIDS, "ppo-search", ((3e-3,), (0, 4)))
    with pytest.raises(ConfigError, match="every pair of training tasks out.*2 complete training"):
        tune(both, seeds=1, nested=True)  # an inner fold would train on nothing
    rows = tune(both, seeds=1)
    assert all(r["left_out"] == r["task"] for r in rows)
    assert {(r["task"], r["length"]) for r in rows} == {(t, e) for t in ("digits-a", "faces") for e in (0, 4)}
    for r in rows:
        test, w = dense.names.index(r["task"]), r["memorization_weight"]
        if r["length"] == 0:  # untrained: exactly gp-prior's search on the same fold
            masks = searched("gp-prior", dense, [1 - test], test, w, max(TUNE_BUDGETS["ppo-search"]))
            assert r["regret"] == pytest.approx(dense.regret(w)[test][masks[: r["fine_tunes"]]].min())
    monkeypatch.setitem(TUNE_GRIDS, "regression", ((0.1,), (10, 40)))
    rows = tune(both, seeds=1, method="regression")
    assert {r["fine_tunes"] for r in rows} == {1, 2, 3, 4} and {r["length"] for r in rows} == {10, 40}
    r = next(r for r in rows if r["task"] == "faces" and r["length"] == 40 and r["fine_tunes"] == 2)
    model = regression_model(prior_of(dense, [0]), 0, dense.param_weight, 40, 0.1)
    masks = searched("regression", dense, [0], 1, r["memorization_weight"], 2, fitted={"regression": model})
    assert r["regret"] == pytest.approx(dense.regret(r["memorization_weight"])[1][masks].min())
    hand = [
        {"learning_rate": lr, "length": e, "regret": v}
        for lr, e, v in [
            (3e-3, 0, 0.2),
            (3e-3, 250, 0.1),
            (3e-4, 250, 0.1),
            (3e-4, 1000, 0.1),
            (3e-4, 0, 0.3),
        ]
    ]
    assert chosen_setting(hand) == (3e-4, 250)  # ties: the shorter, then the smaller rate


def test_search_curves_and_the_benchmark_command(table, tmp_path):
    from memrl.config import dump_config
    from research.benchmark import main, search_curves

    path, cfg = table
    bench_cfg = load_config(
        cfg, {"env.backend": "replay", "env.table": str(path), "env.store": str(tmp_path / "s.sqlite")}
    )
    rows = search_curves(bench_cfg, seeds=1, budget=16, ppo_steps=48, workers=2)
    again = search_curves(load_config(bench_cfg, {"env.tasks": TASKS[1:]}), seeds=1, budget=16, ppo_steps=48)
    for method in ("random", "tpe", "ppo"):  # two worker processes give what one process gives
        assert [r["regret"] for r in again if r["method"] == method] == [
            r["regret"] for r in rows if r["method"] == method and r["task"] == "faces"
        ], method
    assert {r["method"] for r in rows} == {"ppo", "random", "tpe", "nsga2", "gp"}
    for method in ("random", "tpe", "nsga2", "gp"):
        for task in ("digits-a", "faces"):
            curve = [
                r["regret"]
                for r in rows
                if r["method"] == method and r["task"] == task and r["memorization_weight"] == 0.5
            ]
            assert len(curve) == 16 and all(a >= b for a, b in zip(curve, curve[1:])), method
            assert curve[-1] == pytest.approx(0.0), method  # 16 distinct fine-tunes: every mask of K=4
    dump_config(bench_cfg, tmp_path / "suite.yaml")
    assert (
        main(
            [
                "search",
                "--config",
                str(tmp_path / "suite.yaml"),
                "--n-seeds",
                "1",
                "--budget",
                "4",
                "--workers",
                "1",  # the worker processes are checked above; a pool's start-up costs ~15 s
                "--out",
                str(tmp_path / "out"),
                "--parts",
                str(tmp_path / "parts"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "parts").glob("*.json"))) == 2 * 3  # each (task, preference) kept
    assert (tmp_path / "out" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "| random |" in (tmp_path / "out" / "search.md").read_text()


def test_training_on_the_table_reports_a_held_out_task_with_a_live_check(table, tmp_path):
    """What `make demo` does on the shipped tables, on the tiny one: PPO by replay with drawn
    preferences (a training task the table lacks is left out, loudly), then the held-out task's
    report with one live fine-tune beside the table's row."""
    from memrl.agents.policy import load_policy

    from memrl.train_agent import train

    path, cfg = table
    run_cfg = load_config(
        cfg,
        {
            "env.tasks": [*TASKS, {"name": "not-in-the-table", "seed": 9}],
            "env.backend": "replay",
            "env.table": str(path),
            "env.preferences": "uniform",
            "ppo.total_timesteps": 64,
            "ppo.n_steps": 16,
            "ppo.batch_size": 8,
        },
    )
    run = tmp_path / "run"
    train(run_cfg, run)
    card = load_policy(run).card
    assert card["tasks_left_out"] == ["not-in-the-table"]
    assert [t["name"] for t in card["training_tasks"]] == ["digits-a"]
    episodes = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 64 and all(e["cache_hit"] for e in episodes)  # replay: no fine-tune
    check = json.loads((run / "check.json").read_text())
    assert check["task"] == "faces" and set(check["live"]) >= {"canary_log_loss_ratio", "heldout_loss"}
    for key, live in check["live"].items():  # same spec, fine-tuned again: the same numbers
        assert live == pytest.approx(check["table"][key], rel=1e-3, abs=1e-4), key
    report = (run / "report.md").read_text()
    assert "**faces (held out: never trained on)**" in report
    assert "## Live check" in report and "across trade-offs" in report
    for plot in ("pareto.png", "preferences.png", "samples.png"):
        assert (run / plot).read_bytes()[:4] == b"\x89PNG", plot


def rows_of_max(*args):
    return [{"value": max(args)}]


def test_an_interrupted_experiment_resumes_from_its_stored_parts(tmp_path):
    from research.benchmark import in_parallel

    work, keys = [(1, 2), (5, 3), (4, 0)], ["a", "b", "c"]
    expected = [[{"value": 2}], [{"value": 5}], [{"value": 4}]]
    assert in_parallel(rows_of_max, work, 2, keys, tmp_path) == expected  # two worker processes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]
    (tmp_path / "b.json").unlink()  # as if stopped before that unit finished
    calls = []

    def counted(*args):
        calls.append(args)
        return rows_of_max(*args)

    assert in_parallel(counted, work, 1, keys, tmp_path) == expected
    assert calls == [(5, 3)]
    assert in_parallel(counted, work, 1) == expected and len(calls) == 4  # no keys: nothing reused


@pytest.mark.parametrize(
    "damage",
    ["edited", "garbage", "empty", "wrong shape", "pickle", "symlink", "other key"],
)
def test_a_kept_result_that_cannot_be_trusted_is_computed_again_with_a_warning(tmp_path, damage, caplog):
    import pickle

    from research.benchmark import in_parallel

    work, keys = [(1, 2)], ["a"]
    in_parallel(rows_of_max, work, 1, keys, tmp_path)
    kept = tmp_path / "a.json"
    if damage == "edited":  # the published number changed by hand, digest left as it was
        kept.write_text(kept.read_text().replace('"value": 2', '"value": 7'))
    elif damage == "garbage":
        kept.write_bytes(b"\x00\xffnot json")
    elif damage == "empty":
        kept.write_text("")
    elif damage == "wrong shape":
        kept.write_text(json.dumps({"format": 1, "key": "a", "sha256": "x", "rows": 3}))
    elif damage == "pickle":
        kept.write_bytes(pickle.dumps([{"value": 7}]))
    elif damage == "symlink":
        (tmp_path / "elsewhere.json").write_text(kept.read_text().replace('"value": 2', '"value": 7'))
        kept.unlink()
        kept.symlink_to(tmp_path / "elsewhere.json")
    else:
        (tmp_path / "b.json").write_text(kept.read_text())
        kept.unlink()
        (tmp_path / "b.json").rename(kept)
        kept.write_text(kept.read_text().replace('"key": "a"', '"key": "b"'))
    calls = []

    def counted(*args):
        calls.append(args)
        return rows_of_max(*args)

    assert in_parallel(counted, work, 1, keys, tmp_path) == [[{"value": 2}]]
    assert calls == [(1, 2)]
    assert "computing it again" in caplog.text


def test_export_never_overwrites_what_it_should_not(table, tmp_path):
    from memrl.errors import StoreError

    path, _ = table
    work = path.parent / "work.sqlite"
    small = tmp_path / "small.sqlite"
    import_rows(small, path)
    with sqlite3.connect(small) as db:  # a working store that lacks most rows
        db.execute("DELETE FROM evaluations WHERE rowid > 3")
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    other_app = tmp_path / "other.sqlite"
    with sqlite3.connect(other_app) as db:
        db.execute("CREATE TABLE t (x)")
    for out, message in (
        (text, "is not a MemControl-Bench table"),
        (other_app, "is not a MemControl-Bench table"),
        (work, "is the working store itself"),
        (tmp_path, "is a directory"),
    ):
        before = out.read_bytes() if out.is_file() else None
        with pytest.raises(StoreError, match=message):
            export(work, out, "tiny")
        assert before is None or out.read_bytes() == before
    shipped_copy = tmp_path / "table.sqlite"
    shipped_copy.write_bytes(path.read_bytes())
    proc = run_module("memrl.tables", "export", "--store", str(small), "--out", str(shipped_copy))
    assert proc.returncode == 2 and "rows that" in proc.stderr and "Traceback" not in proc.stderr
    assert len(EvaluationStore(shipped_copy, readonly=True)) == ROWS  # untouched
    assert len(EvaluationStore(export(small, shipped_copy, "tiny", force=True), readonly=True)) == 3
    assert len(EvaluationStore(export(work, shipped_copy, "tiny"), readonly=True)) == ROWS  # a superset


@pytest.mark.parametrize("flag,value", [("--workers", "0"), ("--threads", "0"), ("--limit", "-1")])
def test_build_flags_out_of_range_are_refused(flag, value, tmp_path):
    store = str(tmp_path / "s")
    proc = run_module("memrl.tables", "build", "--config", "test", "--store", store, flag, value)
    assert (
        proc.returncode == 2 and f"{flag}={value} must be" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_a_store_that_is_not_a_file_is_refused(tmp_path):
    for store in ("/dev/zero", str(tmp_path)):
        proc = run_module("memrl.tables", "status", "--config", "test", "--store", store)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flags", [["--episodes", "0"], ["--episodes", "-5"], ["--budget", "0"], ["--n-seeds", "0"]]
)
def test_benchmark_flags_out_of_range_are_refused(flags):
    proc = run_module("research.benchmark", "search", *flags)
    assert proc.returncode == 2 and f"{flags[0]}={flags[1]} must be 1 or more" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_search_episodes_replay_the_table_and_reward_improvements(table, tmp_path):
    from gymnasium.utils.env_checker import check_env

    path, cfg = table
    overrides = {
        "env.backend": "replay",
        "env.table": str(path),
        "env.store": str(tmp_path / "s.sqlite"),
        "env.mode": "search",
        "env.budget": 3,
        "env.tasks": TASKS[:1],
    }
    env = gym.make("MemControl-v0", config=cfg, overrides=overrides).unwrapped
    obs, _ = env.reset(seed=0, options={"preference": [0.5, 0.5, 0.0]})
    from memrl.episode import CANDIDATE_FEATURES, SEARCH_GLOBALS, TRIED
    from memrl.reward import with_preference

    g = len(SEARCH_GLOBALS)
    assert env.observation_space.shape == obs.shape == (g + 2**4 * len(CANDIDATE_FEATURES),)
    rows = obs[g:].reshape(16, len(CANDIDATE_FEATURES))
    assert env.prior.names == [TASKS[0]["name"]] and (rows[:, :4] == 0.5).all()  # its own row left out
    task, weights = env.task, with_preference(env.cfg.reward, [0.5, 0.5, 0.0])
    baseline = max(task.reference_rewards(weights))
    indices = [0b0101, 0b0101, 0b1100]
    rewards, best = [], None
    for i, index in enumerate(indices):
        obs, reward, terminated, _, info = env.step(index)
        mask = np.array([int(b) for b in f"{index:04b}"], dtype=np.int8)
        rows = obs[g:].reshape(16, len(CANDIDATE_FEATURES))
        assert info["mask"] == mask.tolist() and rows[index, TRIED] == 1
        value = task.score(mask, weights).reward
        # the change of the best tried reward; the first step against the better reference
        expected = value - baseline if best is None else max(value - best, 0.0)
        best = value if best is None else max(best, value)
        assert reward == pytest.approx(expected) and info["best_reward"] == pytest.approx(best)
        assert terminated == (i == 2) and info["budget_left"] == 2 - i
        rewards.append(reward)
    assert sum(rewards) == pytest.approx(best - baseline) and info["mask_reward"] == pytest.approx(value)
    with pytest.raises(ValueError, match="mask's index"):
        env.reset(seed=0)
        env.step(16)
    check_env(gym.make("MemControl-v0", config=cfg, overrides=overrides).unwrapped)
