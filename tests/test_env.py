import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import memrl  # noqa: F401  (registers MemControl-v0)
from memrl.evaluate import NotInStoreError


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store") / "evals.sqlite")


def make(store_path, **overrides):
    return gym.make("MemControl-v0", config="test", overrides={"env.store": store_path, **overrides})


def test_spaces_come_from_the_search_space(store_path):
    env = make(store_path)
    assert env.action_space == gym.spaces.MultiBinary(4)
    assert env.observation_space.shape == (12,)
    seq = make(store_path, **{"env.mode": "sequential", "env.stop_action": True})
    assert seq.action_space == gym.spaces.Discrete(3)
    assert seq.observation_space.shape == (12 + 2 * 4,)


def test_gymnasium_and_sb3_checkers_pass_on_a_replayed_store(store_path):
    """As intended for checkers: every mask evaluated once live, then served by replay."""
    import itertools

    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    live = make(store_path)
    for mask in itertools.product((0, 1), repeat=4):
        live.reset(seed=0)
        live.step(np.array(mask, dtype=np.int8))
    replay = {"env.backend": "replay"}
    gym_check(make(store_path, **replay).unwrapped)
    sb3_check(make(store_path, **replay).unwrapped, warn=False)
    gym_check(make(store_path, **replay, **{"env.mode": "sequential", "env.stop_action": True}).unwrapped)


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
    assert info2["cache_hit"] and reward2 == reward
    # both references score -1 by construction of the normalisation
    env.reset(seed=0)
    assert env.step(np.ones(4, dtype=np.int8))[1] == pytest.approx(-1.0, abs=1e-5)
    frame = env.unwrapped.render() if env.unwrapped.render_mode else None
    assert frame is None


def test_render_pairs_samples_with_nearest_training_images(store_path):
    env = make(store_path)
    env = gym.make(
        "MemControl-v0", config="test", render_mode="rgb_array", overrides={"env.store": store_path}
    )
    env.reset(seed=0)
    env.step(np.array([1, 0, 0, 0], dtype=np.int8))
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.shape[1] > frame.shape[0] / 16


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


def test_sequential_mode_with_a_budget(store_path):
    env = make(store_path, **{"env.mode": "sequential", "env.max_groups": 1})
    obs, _ = env.reset(seed=0)
    assert obs[12 + 4] == 1  # one-hot of the first group
    obs, reward, terminated, _, _ = env.step(0)
    assert not terminated and reward == 0 and obs[12 + 4 + 1] == 1
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
    assert info["cache_hit"]
    with pytest.raises(NotInStoreError, match="is not in the store"):
        replay.step(np.array([0, 0, 0, 1], dtype=np.int8))


def test_reset_draws_tasks_and_options_force_one(store_path):
    tasks = [{"seed": 1}, {"seed": 2, "private_classes": [0, 1, 2, 3, 4, 5]}]
    env = make(store_path, **{"env.tasks": tasks})
    _, a = env.reset(options={"dataset": 0})
    _, b = env.reset(options={"dataset": 1})
    assert a["dataset_fingerprint"] != b["dataset_fingerprint"]
    seen = {env.reset(seed=s)[1]["task"] for s in range(8)}
    assert seen == {0, 1}
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
