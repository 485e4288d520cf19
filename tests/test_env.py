import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import memrl  # noqa: F401  (registers MemControl-v0)
from memrl.errors import EpisodeOverError, NotInStoreError


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store") / "evals.sqlite")


def make(store_path, **overrides):
    return gym.make("MemControl-v0", config="test", overrides={"env.store": store_path, **overrides})


def test_spaces_come_from_the_search_space(store_path):
    env = make(store_path)
    assert env.action_space == gym.spaces.MultiBinary(4)
    assert env.observation_space.shape == (17 + 2 * 4 + 3,)  # descriptor v2 (K = 4) + preference
    seq = make(store_path, **{"env.mode": "sequential", "env.stop_action": True})
    assert seq.action_space == gym.spaces.Discrete(3)
    assert seq.observation_space.shape == (28 + 2 * 4,)


def test_gymnasium_and_sb3_checkers_pass_on_the_live_test_config(tmp_path):
    """As a user calls it: a live backend, where the checkers' repeated seeded step is a cache hit."""
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    store = str(tmp_path / "live.sqlite")
    gym_check(gym.make("memrl:MemControl-v0", config="test", overrides={"env.store": store}).unwrapped)
    sb3_check(make(store).unwrapped, warn=False)
    sequential = {"env.mode": "sequential", "env.stop_action": True}
    gym_check(make(store, **sequential).unwrapped)


def test_info_is_a_function_of_seed_and_action_and_diagnostics_live_apart(tmp_path):
    env = make(str(tmp_path / "s.sqlite")).unwrapped
    env.reset(seed=0)
    first = env.step(np.array([1, 0, 0, 1], dtype=np.int8))[4]
    assert env.diagnostics["cache_hit"] is False and "total" in env.diagnostics["timings"]
    env.reset(seed=0)
    again = env.step(np.array([1, 0, 0, 1], dtype=np.int8))[4]
    assert env.diagnostics["cache_hit"] is True
    assert again == first and "cache_hit" not in first and "timings" not in first


def test_step_runs_a_real_finetune_and_caches_it(store_path):
    env = make(store_path)
    obs, info = env.reset(seed=0)
    assert np.isfinite(obs).all() and "dataset_fingerprint" in info
    _, reward, terminated, truncated, info = env.step(np.array([0, 1, 1, 0], dtype=np.int8))
    assert terminated and not truncated and info["ok"]
    assert info["groups"] == [env.unwrapped.space.names[1], env.unwrapped.space.names[2]]
    assert 0 < info["trainable_percent"] < 100
    for key in ("canary_copy_fraction", "kid", "heldout_loss", "canary_loss_gap", "noise_norm_canary"):
        assert key in info["metrics"]
    env.reset(seed=0)
    _, reward2, *_, info2 = env.step(np.array([0, 1, 1, 0], dtype=np.int8))
    assert env.unwrapped.diagnostics["cache_hit"] and reward2 == reward and info2 == info
    # both references score -1 by construction of the normalisation
    env.reset(seed=0)
    assert env.step(np.ones(4, dtype=np.int8))[1] == pytest.approx(-1.0, abs=1e-5)
    assert env.unwrapped.render() is None  # render_mode None renders nothing


def test_render_pairs_each_sample_with_its_nearest_training_image(store_path):
    env = gym.make(
        "MemControl-v0", config="test", render_mode="rgb_array", overrides={"env.store": store_path}
    )
    env.reset(seed=0)
    env.step(np.array([1, 0, 0, 0], dtype=np.int8))
    frame = env.render()
    last = env.unwrapped._last
    private = env.unwrapped.task.context.splits.private
    side, pad = 8, 1
    assert frame.dtype == np.uint8 and frame.shape == (16 * (side + pad) + pad, 2 * side + 3 * pad, 3)
    for row in (0, 5, 15):
        y = pad + row * (side + pad)
        left = frame[y : y + side, pad : pad + side, 0]
        right = frame[y : y + side, 2 * pad + side : 2 * pad + 2 * side, 0]
        assert np.array_equal(left, last.samples[row, 0])
        nearest = ((private.images[last.nearest[row], 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        assert np.array_equal(right, nearest)


def test_bad_actions_are_explained(store_path):
    env = make(store_path)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"needs \(4,\)"):
        env.step(np.array([1, 0]))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        env.step(np.array([1, 0, 3, 0]))
    seq = make(store_path, **{"env.mode": "sequential"})
    seq.reset(seed=0)
    with pytest.raises(ValueError, match="is not in Discrete"):
        seq.step(5)


def test_stepping_a_finished_episode_says_to_reset(store_path):
    seq = make(store_path, **{"env.mode": "sequential", "env.max_groups": 1})
    with pytest.raises(EpisodeOverError, match="call reset"):
        seq.unwrapped.step(1)  # unwrapped: gym's own wrapper already refuses this one
    seq.reset(seed=0)
    assert seq.step(1)[2]  # the budget of one group ends the episode
    with pytest.raises(EpisodeOverError, match="episode is over"):
        seq.step(0)
    mask_env = make(store_path)
    mask_env.reset(seed=0)
    mask_env.step(np.array([1, 0, 0, 0], dtype=np.int8))
    with pytest.raises(EpisodeOverError):
        mask_env.step(np.array([1, 0, 0, 0], dtype=np.int8))


def test_sequential_mode_with_a_budget(store_path):
    env = make(store_path, **{"env.mode": "sequential", "env.max_groups": 1})
    obs, _ = env.reset(seed=0)
    assert obs[28 + 4] == 1  # one-hot of the first group
    obs, reward, terminated, _, _ = env.step(0)
    assert not terminated and reward == 0 and obs[28 + 4 + 1] == 1
    obs, reward, terminated, _, info = env.step(1)
    assert terminated and info["mask"] == [0, 1, 0, 0]


def test_replay_serves_stored_masks_and_refuses_unknown_ones(tmp_path):
    store_path = str(tmp_path / "own.sqlite")
    live = make(store_path)
    live.reset(seed=0)
    live.step(np.array([1, 1, 0, 0], dtype=np.int8))
    replay = make(store_path, **{"env.backend": "replay"})
    replay.reset(seed=0)
    _, _, _, _, info = replay.step(np.array([1, 1, 0, 0], dtype=np.int8))
    assert replay.unwrapped.diagnostics["cache_hit"] and info["ok"]
    replay.reset(seed=0)
    with pytest.raises(NotInStoreError, match="is in none of"):
        replay.step(np.array([0, 0, 0, 1], dtype=np.int8))


def test_reset_draws_training_tasks_and_options_force_any(store_path):
    tasks = [
        {"seed": 1},
        {"name": "six", "seed": 2, "private_classes": [0, 1, 2, 3, 4, 5]},
        {"name": "kept", "seed": 3, "heldout": True},
    ]
    env = make(store_path, **{"env.tasks": tasks})
    _, a = env.reset(options={"dataset": 0})
    _, b = env.reset(options={"dataset": "six"})
    _, c = env.reset(options={"dataset": 2})
    assert len({a["dataset_fingerprint"], b["dataset_fingerprint"], c["dataset_fingerprint"]}) == 3
    assert b["task_name"] == "six" and c["task_name"] == "kept"
    seen = {env.reset(seed=s)[1]["task"] for s in range(12)}
    assert seen == {0, 1}  # the held-out task is never drawn
    o1, _ = env.reset(seed=3)
    o2, _ = env.reset(seed=3)
    assert np.array_equal(o1, o2)


def test_make_by_module_path_without_importing_memrl(store_path):
    code = (
        "import gymnasium as gym; env = gym.make('memrl:MemControl-v0', config='test', "
        f"overrides={{'env.store': {store_path!r}}}); print(env.action_space)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "MultiBinary(4)" in out.stdout


def test_a_diverging_finetune_is_a_penalised_failure_not_an_exception(tmp_path):
    env = make(str(tmp_path / "s.sqlite"), **{"finetune.lr": 1e30})
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(np.array([1, 0, 0, 0], dtype=np.int8))
    assert terminated and not info["ok"] and "diverged" in info["error"]
    assert reward == env.unwrapped.cfg.reward.failure_penalty


def test_preferences_are_observed_and_reweight_the_stored_terms(store_path):
    env = make(store_path, **{"env.preferences": "uniform"})
    drawn = [env.reset(seed=s)[1]["preference"] for s in range(6)]
    assert len({round(p[0], 6) for p in drawn}) == 6 and all(abs(p[0] + p[1] - 1) < 1e-6 for p in drawn)
    mask = np.array([0, 1, 0, 1], dtype=np.int8)
    rewards = {}
    for w in (0.0, 1.0):
        obs, info = env.reset(seed=0, options={"preference": [w, 1 - w, 0.0]})
        assert np.allclose(obs[25:], [w, 1 - w, 0.0])
        _, rewards[w], *_, step = env.step(mask)
    # same evaluation (the second step is a stored one), other weights: -quality vs -memorization
    assert env.unwrapped.diagnostics["cache_hit"]
    assert rewards[0.0] == pytest.approx(-step["quality_term"]) and rewards[1.0] == pytest.approx(
        -step["memorization_term"]
    )
    with pytest.raises(ValueError, match="non-negative weights"):
        env.reset(options={"preference": [-1, 0, 0]})
