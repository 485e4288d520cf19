"""Control mode: MemControl-v0 acting during one fine-tune, replayed from a tiny curve suite."""

import json

import gymnasium as gym
import numpy as np
import pytest

import memrl  # noqa: F401  (registers MemControl-v0)
from memrl.config import load_config
from memrl.errors import ConfigError, EpisodeOverError


@pytest.fixture(scope="module")
def curve_cfg(tmp_path_factory):
    """A tiny curve suite (test config, 3 steps, a checkpoint every step), built in process."""
    from memrl.evaluator import make_evaluator
    from memrl.tables import curve_jobs

    store = tmp_path_factory.mktemp("control") / "curves.sqlite"
    cfg = load_config(
        "test",
        {
            "finetune.checkpoint_every": 1,
            "finetune.sample_at": [2],
            "env.tasks": [{"name": "tiny", "seed": 3}, {"name": "other", "seed": 4}],
            "env.store": str(store),
            "env.mode": "control",
            "env.preferences": "uniform",
        },
    )
    make_evaluator(cfg).evaluate_many([j.spec for j in curve_jobs(cfg)])
    return cfg.with_changes({"env.backend": "replay"})  # control replays the curves it built


def test_control_mode_passes_gymnasiums_and_sb3s_checkers(curve_cfg):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make("MemControl-v0", config=curve_cfg, mode="control")
    assert env.action_space == gym.spaces.MultiBinary(5)  # K = 4 groups + stop
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check(env.unwrapped)


def test_stopping_replays_the_stored_checkpoint_exactly(curve_cfg):
    from memrl.curves import load_curves

    table = load_curves(curve_cfg)
    env = gym.make("MemControl-v0", config=curve_cfg, mode="control").unwrapped
    preference = [0.5, 0.5, 0.0]
    obs, info = env.reset(seed=0, options={"dataset": "tiny", "preference": preference})
    assert info["task"] == "tiny" and obs.shape == env.observation_space.shape
    obs, reward, done, truncated, info = env.step([1, 1, 1, 1, 0])  # train every group, go on
    assert not done and reward == 0.0 and info["steps"] == 1 and info["mask"] == [1, 1, 1, 1]
    _, reward, done, _, info = env.step([1, 1, 1, 1, 1])  # stop after the second chunk
    assert info["ok"] and np.isfinite(reward)
    expected = table.rewards(curve_cfg.reward, 0, 0.5)[table.masks.index("1111"), 0, 1]
    assert done and info["delivered_steps"] == 2 and reward == pytest.approx(float(expected))
    with pytest.raises(EpisodeOverError):
        env.step([1, 1, 1, 1, 1])
    env.zero_signals = env.zero_descriptor = True  # the ablations: the run's signals and the data hidden
    obs, _ = env.reset(seed=0, options={"dataset": "tiny", "preference": preference})
    obs, *_ = env.step([1, 1, 1, 1, 0])
    width = len(env.descriptor(0))
    assert not obs[:width].any() and obs[width + 3] > 0  # no descriptor; progress still shown
    assert np.allclose(obs[-9:-4], [1, 1, 0.5, 0, 0]) and not obs[-4:].any()  # the base model's signals


def test_a_mask_change_is_not_replayed_and_is_counted(curve_cfg):
    env = gym.make("MemControl-v0", config=curve_cfg, mode="control").unwrapped
    env.reset(seed=1, options={"dataset": 0})
    _, _, _, _, info = env.step([1, 0, 0, 0, 0])
    assert info["mask"] == [1, 0, 0, 0] and info["mask_changes_ignored"] == 0
    _, _, _, _, info = env.step([0, 1, 0, 0, 0])
    assert info["mask"] == [1, 0, 0, 0] and info["mask_changes_ignored"] == 1
    _, _, done, _, info = env.step([0, 1, 0, 0, 0])
    assert done and info["delivered_steps"] == 3  # the fine-tune's last step ends the episode
    env.reset(seed=2, options={"dataset": 0})
    _, reward, done, _, info = env.step([0, 0, 1, 0, 1])  # stop after one chunk: step 1, not sampled
    assert done and info["ok"] and np.isfinite(reward)


def test_a_mask_without_a_curve_snaps_to_the_nearest_stored_one(curve_cfg):
    env = gym.make("MemControl-v0", config=curve_cfg, mode="control").unwrapped
    stored = {"".join(map(str, m)) for m in env.masks}
    env.reset(seed=0, options={"dataset": 0})
    asked = next(
        m for m in ("0110", "0101", "1010", "1100", "0011") if m not in stored
    )  # some two-group mask without a curve
    _, _, _, _, info = env.step([*map(int, asked), 0])
    got = "".join(map(str, info["mask"]))
    assert got in stored and sum(a != b for a, b in zip(got, asked)) == min(
        sum(a != b for a, b in zip(m, asked)) for m in stored
    )


def test_ppo_learns_on_replayed_control(curve_cfg):
    from memrl.agents.ppo import build_ppo

    cfg = curve_cfg.with_changes({"ppo.n_steps": 8, "ppo.batch_size": 4, "ppo.total_timesteps": 16})
    env = gym.make("MemControl-v0", config=cfg).unwrapped
    model = build_ppo(cfg, env)
    assert model.gamma == 1.0  # one reward, the delivered model's: undiscounted
    model.learn(16)
    assert model.num_timesteps >= 16


def test_an_untrained_controller_explores_every_length_of_run():
    """The stop bit starts at 2 / chunks (not 1/2, which ends most episodes within two chunks)."""
    import torch
    from memrl.agents.ppo import build_ppo, stop_prior

    cfg = load_config("bench3", {"env.mode": "control"})
    assert stop_prior(cfg) == pytest.approx(2 * 25 / 400)
    assert (
        load_config("bench3").ppo.gamma is None
        and build_ppo(load_config("test"), gym.make("MemControl-v0", config="test").unwrapped).gamma == 0.99
    )
    env = gym.make("MemControl-v0", config="bench3", mode="control").unwrapped  # the shipped curve table
    model = build_ppo(cfg, env)
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        probs = model.policy.get_distribution(torch.as_tensor(obs)[None]).distribution.probs[0]
    assert float(probs[-1]) == pytest.approx(0.125, abs=0.03) and 0.3 < float(probs[:-1].mean()) < 0.7


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"env.mode": "control"}, "records none .*finetune.checkpoint_every is unset"),
        (
            {"env.mode": "control", "finetune.checkpoint_every": 1, "env.chunk": 2},
            "env.chunk=2 must be a multiple of finetune.checkpoint_every=1 that divides finetune.steps=3",
        ),
        ({"env.chunk": 1}, "env.chunk=1 is for env.mode=control"),
        ({"env.mask_changes": "apply"}, "env.mask_changes='apply' is for env.mode=control"),
        (
            {
                "env.mode": "control",
                "finetune.checkpoint_every": 1,
                "env.backend": "replay",
                "env.mask_changes": "apply",
            },
            "env.mask_changes=apply cannot be replayed .*env.backend=inprocess",
        ),
        (
            {"env.mode": "control", "finetune.checkpoint_every": 1, "env.mask_changes": "yes"},
            "'ignore' or 'apply'",
        ),
    ],
)
def test_a_bad_control_setting_is_named_with_its_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("test", overrides)


def test_control_on_a_suite_without_complete_curves_says_how_to_build_them(tmp_path):
    cfg = load_config(
        "test",
        {
            "env.mode": "control",
            "env.backend": "replay",
            "finetune.checkpoint_every": 1,
            "env.store": str(tmp_path / "empty.sqlite"),
        },
    )
    with pytest.raises(ConfigError, match="no training task of this suite has complete curves"):
        gym.make("MemControl-v0", config=cfg)


def train_controller(cfg, config_file):
    """``python -m memrl.train_agent`` on ``cfg`` (written to ``config_file``): its run folder and policy."""
    from memrl.agents import load_policy

    from memrl.config import dump_config
    from memrl.runs import RunFolder
    from memrl.testing import run_module

    dump_config(cfg, config_file)
    run_dir = config_file.with_suffix("")
    proc = run_module("memrl.train_agent", "--config", str(config_file), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = RunFolder(run_dir)
    return folder, load_policy(folder.policy)


def test_train_agent_trains_a_controller_that_loads_and_refuses_to_propose_a_mask(curve_cfg, tmp_path):
    from memrl.agents import PolicyError

    from memrl.testing import run_module

    cfg = curve_cfg.with_changes({"ppo.n_steps": 8, "ppo.batch_size": 4, "ppo.total_timesteps": 16})
    folder, policy = train_controller(cfg, tmp_path / "control.yaml")
    assert policy.card["action_mode"] == "control" and folder.episodes.read_text().count("\n") >= 4
    with pytest.raises(PolicyError, match="is a controller"):
        policy.candidates(np.zeros(10))
    import csv

    from memrl.envs.control import ControlEnv

    from research.benchmark.cli import main as benchmark
    from research.benchmark.recipes import regret_array

    live = tmp_path / "live"  # judged by real fine-tunes, it scores what replay gives it
    argv = ["live", "--config", str(tmp_path / "control.yaml"), "--policy", str(folder.policy)]
    assert benchmark([*argv, "--tasks", "tiny", "--out", str(live)]) == 0
    rows = list(csv.DictReader((live / "live.csv").open()))
    replay = ControlEnv(cfg, tasks=[0])
    assert len(rows) == 3 and "| tiny |" in (live / "live.md").read_text()
    for row in rows:
        w = float(row["memorization_weight"])
        obs, _ = replay.reset(seed=0, options={"dataset": "tiny", "preference": [w, 1 - w, 0]})
        done = False
        while not done:
            obs, _, done, _, info = replay.step((policy.probabilities(obs) > 0.5).astype(np.int8))
        expected = regret_array(replay.curves, cfg.reward, 0, w)[replay.mask_row, 0, replay.checkpoint]
        assert int(row["delivered_steps"]) == info["delivered_steps"]
        assert float(row["regret"]) == pytest.approx(float(expected), abs=1e-3)
    assert benchmark([*argv, "--tasks", "nowhere", "--out", str(live)]) == 2  # named with the choices
    out = tmp_path / "applied"  # the controller's guarded fine-tune of a user's images
    args = ["--policy", str(folder.policy), "--data", "digits", "--out", str(out), "--sweep", "0"]
    proc = run_module("memrl.apply_policy", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    trace = result["control_trace"]
    assert trace and trace[-1]["stop"] and 1 <= trace[-1]["steps"] <= 3 and result["final_steps"] == 3
    assert (out / "model").is_dir() and (out / "control.png").read_bytes()[:4] == b"\x89PNG"
    assert "## The controller's run" in (out / "report.md").read_text()
    searched = tmp_path / "searched"  # --budget: a search over (mask, length), the best checkpoint delivered
    proc = run_module("memrl.apply_policy", *args[:-4], "--out", str(searched), "--budget", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((searched / "result.json").read_text())
    trace = result["search_trace"]
    assert len(trace) == 2 and all(1 <= t["steps"] <= 3 for t in trace)
    best = max(trace, key=lambda t: t["reward"])
    assert result["mask"] == best["mask"] and result["final_steps"] == best["steps"]
    assert (searched / "model").is_dir() and "at " in proc.stdout and " steps reward" in proc.stdout


def test_stopping_rules_are_fixed_on_training_tasks_and_judged_on_the_test_task(curve_cfg):
    from memrl.curves import load_curves
    from research.benchmark.recipes import _stop_early, _stop_membership, recipe_regret, recipe_rows

    assert _stop_early(np.array([3.0, 2.0, 2.5, 2.4, 1.0]), 2) == 1  # no gain for 2 checkpoints after 1
    assert _stop_early(np.array([3.0, 2.0, 1.0]), 2) == 2  # still improving at the end
    assert _stop_membership(np.array([0.5, 0.56, 0.7]), 0.6) == 1  # the checkpoint before crossing
    assert _stop_membership(np.array([0.5, 0.5]), 0.6) == 1  # never crossed: the last
    table = load_curves(curve_cfg)
    rows = recipe_rows(table, curve_cfg.reward)
    methods = {r["method"] for r in rows}
    assert {"single-best-recipe", "ones@tuned-steps", "early-stop", "membership-stop", "portfolio"} <= methods
    masks_only = [r for r in rows if r["method"] != "full@tuned-steps"]  # full may beat every mask
    assert all(0 <= r["regret"] <= 1 for r in masks_only) and {r["task"] for r in rows} == {"tiny", "other"}
    assert "full@tuned-steps" in methods
    for r in rows:
        if r["method"] == "single-best-recipe" and r["task"] == "tiny" and r["memorization_weight"] == 0.5:
            other = table.names.index(
                "other"
            )  # the recipe is the training task's best, read on the test task
            regret = recipe_regret(table, curve_cfg.reward, other, 0.5)
            regret[table.masks.index("full")] = np.nan
            m, c = np.unravel_index(int(np.nanargmin(regret)), regret.shape)
            assert r["recipe"] == f"{table.masks[m]}@{int(table.steps[c])}"
    portfolio = [r["regret"] for r in rows if r["method"] == "portfolio" and r["task"] == "tiny"]
    assert portfolio[:4] == sorted(portfolio[:4], reverse=True)  # more fine-tunes never hurt


def test_folds_leave_one_source_out_only_across_sources(curve_cfg):
    from memrl.curves import load_curves
    from research.benchmark.recipes import curve_folds

    table = load_curves(curve_cfg)
    assert table.sources == ["digits", "digits"]
    splits = {split for _, _, split in curve_folds(table)}
    assert splits == {"leave one task out"}  # one source: nothing left to train on without it
    table.sources = ["digits", "faces"]
    loso = [(t, train) for t, train, split in curve_folds(table) if split == "leave one source out"]
    assert loso == [(0, [1]), (1, [0])]


def test_intervals_resample_fine_tune_noise_and_pair_identical_recipes(curve_cfg):
    from memrl.curves import load_curves
    from research.benchmark.recipes import bootstrap_means, recipe_rows

    table = load_curves(curve_cfg)
    rows = [r for r in recipe_rows(table, curve_cfg.reward) if r["fine_tunes"] == 1]
    same = [{**r, "method": "copy"} for r in rows if r["method"] == "single-best-recipe"]
    draws = bootstrap_means(rows + same, table, curve_cfg.reward, n_boot=200)
    split = "leave one task out"
    assert np.array_equal(draws[(split, "copy", 1)], draws[(split, "single-best-recipe", 1)])
    one_task = [r for r in rows if r["task"] == "tiny"]  # no task to resample: what varies is noise
    noise = bootstrap_means(one_task, table, curve_cfg.reward, n_boot=200)
    assert np.std(noise[(split, "single-best-recipe", 1)]) > 0
    for values in table.values.values():  # "tiny" without its noise rows: the other task's noise
        values[table.names.index("tiny"), :, 1:, :] = np.nan
    pooled = bootstrap_means(one_task, table, curve_cfg.reward, n_boot=200)
    assert np.std(pooled[(split, "single-best-recipe", 1)]) > 0


def test_steps_regression_and_gp_prior_rules():
    from research.benchmark.recipes import _gp_prior, _steps_regression

    steps = np.arange(25, 401, 25)
    size = np.array([1.0, 2.0, 3.0, 4.0])
    best = 25 * np.exp(0.5 * size)  # longer for larger data
    features = size[:, None]
    assert steps[_steps_regression(features, best, np.array([5.0]), steps)] == 300  # 25 e^2.5 = 305
    bits = np.array([[0, 1], [1, 0], [1, 1]], dtype=float)
    tried = _gp_prior(np.array([0.3, 0.1, 0.5]), np.array([0.0, 0.9, 0.8]), bits, 3)
    assert tried[0] == 1 and sorted(tried) == [0, 1, 2]  # the prior's best first, never twice


def test_the_recipes_command_writes_its_table_and_record(curve_cfg, tmp_path):
    from memrl.config import dump_config
    from research.benchmark.cli import main

    dump_config(curve_cfg, tmp_path / "curves.yaml")
    argv = ["recipes", "--config", str(tmp_path / "curves.yaml"), "--out", str(tmp_path / "out")]
    parts = tmp_path / "parts"
    controlled = [
        "--episodes",
        "64",
        "--n-seeds",
        "1",
        "--control-splits",
        "leave one task out",
        "--parts",
        str(parts),
    ]
    assert main([*argv, *controlled]) == 0  # with a controller, trained per fold in 2 processes
    assert len(list(parts.glob("*.json"))) == 2 * 3  # each fold's 3 variants kept: a rerun resumes
    text = (tmp_path / "out" / "recipes.md").read_text()
    assert "| leave one task out | early-stop | 1 |" in text and (tmp_path / "out" / "recipes.csv").is_file()
    for label in ("controller", "controller-no-signals", "controller-no-descriptor"):
        assert f"| leave one task out | {label} | 1 |" in text
    from memrl.agents import load_policy

    from research.release import main as release

    shipped = tmp_path / "shipped"  # a controller released with the benchmark's numbers on its card
    small = ["--set", "ppo.n_steps=8", "ppo.batch_size=4", "ppo.total_timesteps=16"]
    assert (
        release(
            [
                "--config",
                str(tmp_path / "curves.yaml"),
                *small,
                "--results",
                str(tmp_path / "out"),
                "--to",
                str(shipped),
            ]
        )
        == 0
    )
    card = load_policy(shipped / "policy.zip").card
    assert card["action_mode"] == "control" and card["config"]["env"]["store"] is None
    numbers = card["benchmark"]["controller"]["leave one task out"]
    assert numbers["tasks"] == 2 and numbers["worst_regret"] >= numbers["mean_regret"]
    assert "early-stop" in card["benchmark"] and "per-fold" in card["benchmark"]["note"]


def test_live_control_pauses_a_real_fine_tune_and_delivers_what_the_curve_recorded(curve_cfg):
    """Live (any backend but replay): each step trains one chunk of a real fine-tune in a worker
    thread; stopping after two chunks delivers the model the curve measured at step 2."""
    from gymnasium.utils.env_checker import check_env

    from memrl.curves import load_curves

    live_cfg = curve_cfg.with_changes({"env.backend": "inprocess"})
    env = gym.make("MemControl-v0", config=live_cfg).unwrapped
    assert env.live
    env.reset(seed=0, options={"dataset": "tiny", "preference": [0.5, 0.5, 0.0]})
    _, reward, done, _, info = env.step([1, 1, 1, 1, 0])
    assert not done and info["steps"] == 1 and env.run is not None
    _, reward, done, _, info = env.step([1, 1, 1, 1, 1])
    assert done and info["delivered_steps"] == 2 and np.isfinite(reward)
    table = load_curves(curve_cfg)
    stored = table.metric("heldout_loss", "tiny", "1111", 2)
    assert info["metrics"]["heldout_loss"] == pytest.approx(stored, rel=1e-5)
    expected = table.rewards(curve_cfg.reward, 0, 0.5)[table.masks.index("1111"), 0, 1]
    assert reward == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    env.reset(seed=1)
    env.step([0, 1, 0, 0, 0])  # a paused run in its thread ...
    env.close()  # ... ends cleanly
    assert env.run is None
    check_env(env, skip_render_check=True)


def test_live_control_applies_mask_changes_when_asked(curve_cfg):
    """env.mask_changes=apply (live only): each chunk trains the groups its step asked for; the
    delivered model's mask is every group that trained."""
    live_cfg = curve_cfg.with_changes({"env.backend": "inprocess", "env.mask_changes": "apply"})
    env = gym.make("MemControl-v0", config=live_cfg).unwrapped
    env.reset(seed=0, options={"dataset": "tiny", "preference": [0.5, 0.5, 0.0]})
    obs, _, _, _, info = env.step([1, 0, 0, 0, 0])
    assert info["mask"] == [1, 0, 0, 0] and info["mask_changes"] == 0
    obs, _, _, _, info = env.step([0, 0, 1, 0, 0])
    assert info["mask"] == [0, 0, 1, 0] and info["mask_changes"] == 1 and info["mask_changes_ignored"] == 0
    assert list(obs[-13:-9]) == [0, 0, 1, 0]  # the observation shows the groups training now
    shares = obs[-4:]
    assert shares[2] == pytest.approx(1.0) and shares[0] == 0  # the second chunk's gradient: group 3's
    _, reward, done, _, info = env.step([0, 0, 1, 0, 1])
    assert done and info["ok"] and np.isfinite(reward)
    ctx_space = env.run.ctx.space
    assert info["metrics"]["group_fraction"] == pytest.approx(ctx_space.group_fraction([1, 0, 1, 0]))
    env.close()


def test_a_controller_trained_live_with_mask_changes_applies_them_for_a_user(curve_cfg, tmp_path):
    """Issue 52's stretch: a controller that may change the groups mid-run, trained live with
    parallel envs; its guarded fine-tune (apply_policy's) applies its changes."""
    from memrl.envs.control import guarded_run

    from memrl.apply_policy import control_section
    from memrl.context import TaskContext

    cfg = curve_cfg.with_changes(
        {
            "env.backend": "inprocess",
            "env.mask_changes": "apply",
            "ppo.n_envs": 2,
            "ppo.n_steps": 2,
            "ppo.batch_size": 4,
            "ppo.total_timesteps": 4,
        }
    )
    _, policy = train_controller(cfg, tmp_path / "live.yaml")
    assert policy.card["config"]["env"]["mask_changes"] == "apply"
    ctx = TaskContext.get(curve_cfg)
    descriptor = np.zeros(len(policy.card["descriptor"]["fields"]), dtype=np.float32)
    asked = []
    probabilities = policy.probabilities

    def alternating(obs):  # the trained network, its groups flipped at every pause: changes to apply
        p = probabilities(obs)
        asked.append(p)
        p[:-1] = p[:-1] if len(asked) % 2 else 1 - p[:-1]
        p[-1] = 0.0
        return p

    policy.probabilities = alternating
    model, trained, trace = guarded_run(policy, ctx, descriptor, np.array([0.5, 0.5, 0.0], np.float32), 1)
    masks = np.array([t["mask"] for t in trace])
    assert len(trace) == 3 and trace[-1]["end"] and not np.array_equal(masks[0], masks[1])
    assert trained.tolist() == np.bitwise_or.reduce(masks, axis=0).tolist()
    assert f"`{''.join(map(str, masks[1]))}`" in control_section(trace)


def test_the_shipped_curve_table_replays_out_of_the_box():
    """``configs/bench3.yaml`` names the shipped curve table: a user's gym.make replays it."""
    env = gym.make(
        "MemControl-v0", config="bench3", mode="control", overrides=["env.backend=replay"]
    ).unwrapped
    table = env.curves
    assert "digits" in [table.names[t] for t in env.tasks]  # a complete training task
    env.reset(seed=0, options={"dataset": "digits", "preference": [0.5, 0.5, 0.0]})
    ones = [1] * env.k
    for _ in range(5):
        _, reward, done, _, info = env.step([*ones, 0])
    _, reward, done, _, info = env.step([*ones, 1])  # deliver after 6 chunks: 150 steps
    assert done and info["delivered_steps"] == 150
    t = table.names.index("digits")
    expected = table.rewards(env.cfg.reward, t, 0.5)[table.masks.index("1" * env.k), 0, 5]
    assert reward == pytest.approx(float(expected))


def test_a_controller_is_judged_on_held_out_tasks(curve_cfg):
    from memrl.envs.control import ControlEnv, control_metrics

    from memrl.curves import load_curves
    from research.benchmark.recipes import controller_rows

    with pytest.raises(ConfigError, match="lacks the metrics control mode replays"):
        ControlEnv(curve_cfg, curves=load_curves(curve_cfg, ("heldout_loss",)))
    table = load_curves(curve_cfg, control_metrics(curve_cfg))
    table.heldout[1] = True  # "other" held out: trained on "tiny" alone
    cfg = curve_cfg.with_changes({"ppo.n_steps": 8, "ppo.batch_size": 4})
    rows = controller_rows(cfg, table, 16, seeds=(0, 1), splits=("held out",))
    assert {r["task"] for r in rows} == {"other"} and {r["split"] for r in rows} == {"held out"}
    assert {r["seed"] for r in rows} == {0, 1}  # every seed's runs in one pool
    assert len(rows) == 2 * 3 * 3 and all(np.isfinite(r["regret"]) for r in rows)  # seeds x variants x w


def test_the_controllers_entropy_is_tuned_leaving_a_training_source_out(curve_cfg):
    from memrl.envs.control import control_metrics

    from memrl.curves import load_curves
    from memrl.errors import MemrlError
    from research.benchmark.recipes import tune_controller, tuned_entropy, tuning_lines

    table = load_curves(curve_cfg, control_metrics(curve_cfg))
    cfg = curve_cfg.with_changes({"ppo.n_steps": 8, "ppo.batch_size": 4})
    with pytest.raises(MemrlError, match="two sources or more"):
        tune_controller(cfg, table, 16, seeds=1, grid=(0.0,))  # both tasks are digits: no fold
    table.sources = ["digits", "fashion"]  # each task its own source: two folds
    rows = tune_controller(cfg, table, 16, seeds=1, grid=(0.0, 0.5))
    assert {r["split"] for r in rows} == {"leave one source out"}
    assert {r["method"] for r in rows} == {"controller"}  # no ablations
    assert sorted({r["ent_coef"] for r in rows}) == [0.0, 0.5] and len(rows) == 2 * 2 * 3  # grid x tasks x w
    means = {c: np.mean([r["regret"] for r in rows if r["ent_coef"] == c]) for c in (0.0, 0.5)}
    assert tuned_entropy(rows) == min(means, key=lambda c: (round(means[c], 6), c))
    tie = [{"ent_coef": c, "regret": 0.1} for c in (0.3, 0.1)]
    assert tuned_entropy(tie) == 0.1  # a tie goes to the smaller coefficient
    assert f"| {tuned_entropy(rows):g} (chosen) |" in tuning_lines(rows)
