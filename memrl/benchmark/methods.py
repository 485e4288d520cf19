"""The methods under test. Each returns the table indices of the masks it tries on the test task,
in order (its first is its zero-shot proposal)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memrl.benchmark.table import BenchTable, mask_index
from memrl.config import Config, load_config


def single_best(table: BenchTable, train: list[int], w: float) -> int:
    """The mask with the best mean reward over the training tasks (masks missing anywhere skipped)."""
    mean = table.rewards(w)[train].mean(axis=0)
    return int(np.nanargmax(np.where(np.isfinite(mean), mean, -np.inf)))


def random_search(table: BenchTable, test: int, budget: int, rng: np.random.Generator) -> list[int]:
    available = np.flatnonzero(np.isfinite(table.terms[test, :, 0]))
    return [int(i) for i in rng.permutation(available)[:budget]]


def optuna_search(
    table: BenchTable, test: int, w: float, budget: int, seed: int, sampler: str = "tpe"
) -> list[int]:
    """Masks an Optuna sampler (``tpe``, ``gp``, or ``nsga2`` on the two terms) tries on the test
    task, in order; a missing or failed mask scores the failure penalty."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rewards, k = table.rewards(w)[test], table.masks.shape[1]
    terms = table.terms[test]
    startup = min(5, budget)
    if sampler == "nsga2":
        chosen: Any = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(16, budget // 2)))
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=chosen)
    else:
        cls = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.GPSampler
        study = optuna.create_study(direction="maximize", sampler=cls(seed=seed, n_startup_trials=startup))
    tried: list[int] = []

    def objective(trial: Any) -> Any:
        bits = [trial.suggest_int(f"g{j}", 0, 1) for j in range(k)]
        index = int("".join(map(str, bits)), 2)
        tried.append(index)
        if sampler == "nsga2":
            m, q = terms[index, 0], terms[index, 1]
            return (float(m), float(q)) if np.isfinite(m) else (2.0, 2.0)
        return float(rewards[index]) if np.isfinite(rewards[index]) else -2.0

    def enough(study: Any, trial: Any) -> None:  # a repeated mask is a stored evaluation: free
        if len(set(tried)) >= budget:
            study.stop()

    study.optimize(objective, n_trials=4 * budget, callbacks=[enough])
    return list(dict.fromkeys(tried))[:budget]


SEARCH_PPO = {
    "ppo.n_steps": 8,
    "ppo.batch_size": 8,
    "ppo.n_epochs": 10,
    "ppo.learning_rate": 3e-3,
    "ppo.ent_coef": 0.01,
}
"""PPO searching one task from scratch: short rollouts, many epochs (every sample is a fine-tune)."""


def ppo_search(cfg: Config, task: str, w: float, seed: int, budget: int, max_steps: int = 4000) -> list[int]:
    """Distinct masks PPO proposes while learning from scratch on one task (replay), in order, until
    ``budget`` distinct ones (= fine-tunes; a repeated mask is a stored evaluation) or ``max_steps``."""
    from stable_baselines3.common.callbacks import BaseCallback

    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv

    one = load_config(
        cfg,
        {
            **SEARCH_PPO,
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") == task],
            "env.preferences": "fixed",
            "reward.memorization_weight": w,
            "reward.quality_weight": 1.0 - w,
            "seed": seed,
        },
    )
    seen: list[int] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "mask" in info:
                    index = mask_index(info["mask"])
                    if index not in seen:
                        seen.append(index)
            return len(seen) < budget

    build_ppo(one, MemControlEnv(one)).learn(max_steps, callback=Record())
    return seen[:budget]


def regression(table: BenchTable, train: list[int], test: int, w: float, seed: int) -> int:
    """Argmax of a regression from (descriptor, preference, mask) to reward fit on ``train``."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    def features(t: int, weight: float) -> np.ndarray:
        n = len(table.masks)
        d = np.repeat(table.descriptors[t][None], n, 0)
        p = np.repeat(table.preference(weight)[None], n, 0)
        return np.concatenate([d, p, table.masks], axis=1)

    xs, ys = [], []
    for t in train:
        for weight in np.linspace(0, 1, 11):
            r = table.rewards(weight)[t]
            keep = np.isfinite(r)
            xs.append(features(t, weight)[keep])
            ys.append(r[keep])
    model = HistGradientBoostingRegressor(random_state=seed, max_iter=200).fit(
        np.concatenate(xs), np.concatenate(ys)
    )
    predicted = model.predict(features(test, w))
    predicted[~np.isfinite(table.terms[test, :, 0])] = -np.inf
    return int(np.argmax(predicted))


def train_policies(
    cfg: Config,
    tasks: list[str],
    seed: int,
    episodes: list[int],
    zero_descriptor: bool = False,
    mode: str = "mask",
) -> list[Any]:
    """PPO trained by replay on ``tasks`` with uniformly drawn preferences: a
    :class:`~memrl.agents.policy.Policy` snapshot after each count of ``episodes`` (= masks
    evaluated; a sequential episode is several steps). ``zero_descriptor`` hides the descriptor."""
    import copy

    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback

    from memrl.agents.policy import Policy
    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv

    train_cfg = load_config(
        cfg,
        {
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") in tasks],
            "env.preferences": "uniform",
            "env.mode": mode,
            "seed": seed,
        },
    )
    env: Any = MemControlEnv(train_cfg)
    if zero_descriptor:
        env = gym.wrappers.TransformObservation(env, _zero_descriptor, env.observation_space)

    class Episodes(BaseCallback):
        target, done = 0, 0

        def _on_step(self) -> bool:
            self.done += int(sum(self.locals["dones"]))
            return self.done < self.target

    model, counter, out = build_ppo(train_cfg, env), Episodes(), []
    steps_per_episode = 1 if mode == "mask" else env.unwrapped.k + 1
    for target in sorted(episodes):
        counter.target = target
        model.learn(steps_per_episode * (target - counter.done), callback=counter, reset_num_timesteps=False)
        snapshot = Policy.of_model(model, train_cfg)
        out.append(dataclasses.replace(snapshot, network=copy.deepcopy(model.policy)))
    return out


def _zero_descriptor(obs: np.ndarray) -> np.ndarray:
    """The observation with its descriptor part zeroed (only the preference is left)."""
    from memrl.data.descriptor import DESCRIPTOR_FIELDS

    out = obs.copy()
    out[: len(DESCRIPTOR_FIELDS)] = 0
    return out


def policy_masks(
    policy: Any, table: BenchTable, test: int, w: float, n: int, zero: bool = False
) -> list[int]:
    """The ``n`` most probable masks of ``policy`` for the test task (one for a sequential
    policy), as table indices."""
    descriptor = np.zeros_like(table.descriptors[test]) if zero else table.descriptors[test]
    return [mask_index(m) for m in policy.candidates(descriptor, n, table.preference(w))]


def presets(names: list[str]) -> dict[str, np.ndarray]:
    """The hand-picked masks: attention of the down blocks, the mid block, the up blocks, and all
    attention (the mask of ones)."""
    out = {}
    for family in ("down_blocks", "mid_block", "up_blocks"):
        mask = np.array([int(n.split(".")[0] == family) for n in names], dtype=np.int8)
        if 0 < mask.sum() < len(names):
            out[f"{family.replace('_', '-')} attention"] = mask
    out["all attention"] = np.ones(len(names), dtype=np.int8)
    return out
