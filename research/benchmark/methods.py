"""The methods under test, on a suite's tables: every search method comes from the one registry
(:mod:`memrl.searchers`), run on a :class:`~memrl.searchers.TableOracle`; what is left here is
PPO trained by replay (one-shot policies, search policies, and PPO from scratch on one task).
Each method's result is the table indices of the masks it tries on the test task, in order."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memrl.config import Config
from memrl.descriptor import descriptor_fields
from memrl.prior import TransferPrior
from memrl.searchers import Knowledge, SearchPolicySearcher, TableOracle, make_searcher, run
from memrl.table import BenchTable, mask_index

__all__ = [
    "ONE_SHOT_PPO",
    "SEARCH_PPO",
    "knowledge",
    "policy_masks",
    "ppo_search",
    "prior_of",
    "search_policy_masks",
    "searched",
    "train_policies",
]


def prior_of(table: BenchTable, train: list[int]) -> TransferPrior:
    """The training tasks' rows as a :class:`~memrl.prior.TransferPrior` (what the search policy
    sees; the transfer searchers read the same one)."""
    return TransferPrior([table.names[t] for t in train], table.descriptors[train], table.terms[train])


def knowledge(
    table: BenchTable,
    train: list[int],
    test: int,
    w: float,
    budget: int,
    seed: int = 0,
    group_names: list[str] | None = None,
    zero_descriptor: bool = False,
    **extra: Any,
) -> Knowledge:
    """What a searcher may know when it searches ``test`` at memorization weight ``w``: the
    training tasks' tables (``train``), the test task's descriptor (zeros: ``zero_descriptor``),
    which masks its table holds; ``extra``: ``policy``, ``fitted``."""
    descriptor = table.descriptors[test]
    return Knowledge(
        k=table.masks.shape[1],
        preference=table.preference(w),
        seed=seed,
        budget=budget,
        group_names=group_names,
        descriptor=np.zeros_like(descriptor) if zero_descriptor else descriptor,
        prior=prior_of(table, train) if train else None,
        available=TableOracle(table, test, w).available(),
        **extra,
    )


def searched(
    name: str,
    table: BenchTable,
    train: list[int],
    test: int,
    w: float,
    budget: int,
    seed: int = 0,
    **extra: Any,
) -> list[int]:
    """The table indices of the masks registered searcher ``name`` tries on ``test``, in order
    (at most ``budget``; a zero-shot list may be shorter); ``extra`` as :func:`knowledge`."""
    searcher = make_searcher(name, knowledge(table, train, test, w, budget, seed, **extra))
    return [mask_index(m) for m in run(searcher, TableOracle(table, test, w), budget).masks]


def search_policy_masks(
    policy: Any,
    table: BenchTable,
    test: int,
    w: float,
    budget: int,
    zero_descriptor: bool = False,
    zero_history: bool = False,
) -> list[int]:
    """The masks a search policy evaluates on the test task, in order, each result read off the
    table (the references' rewards give its baseline, as they would live); ``zero_descriptor`` and
    ``zero_history`` are the two ablations."""
    kn = knowledge(table, [], test, w, budget, zero_descriptor=zero_descriptor)
    searcher = SearchPolicySearcher(policy, kn, zero_history)
    return [mask_index(m) for m in run(searcher, TableOracle(table, test, w), budget).masks]


def policy_masks(
    policy: Any, table: BenchTable, test: int, w: float, n: int, zero: bool = False
) -> list[int]:
    """The ``n`` most probable masks of a one-shot ``policy`` for the test task (one for a
    sequential policy), as table indices."""
    return searched("policy", table, [], test, w, n, zero_descriptor=zero, policy=policy)


SEARCH_PPO = {
    "ppo.n_steps": 8,
    "ppo.batch_size": 8,
    "ppo.n_epochs": 10,
    "ppo.learning_rate": 3e-3,
    "ppo.ent_coef": 0.01,
}
"""PPO searching one task from scratch: short rollouts, many epochs (every sample is a fine-tune)."""

ONE_SHOT_PPO = {"ppo.learning_rate": 3e-3}
"""The one-shot (mask mode) policy's recipe, over ``cfg.ppo`` (which is the shipped search
policy's): ``tune --method ppo`` chose 3e-3 with 10,000 episodes (bench/results/benchmark/
tune-ppo.md), where ``tune`` searches the search policy at 3e-4."""


def ppo_search(cfg: Config, task: str, w: float, seed: int, budget: int, max_steps: int = 4000) -> list[int]:
    """Distinct masks PPO proposes while learning from scratch on one task (replay), in order, until
    ``budget`` distinct ones (= fine-tunes; a repeated mask is a stored evaluation) or ``max_steps``."""
    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv
    from stable_baselines3.common.callbacks import BaseCallback

    one = cfg.with_changes(
        {
            **SEARCH_PPO,
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") == task],
            "env.preferences": "fixed",
            "env.mode": "mask",
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


def train_policies(
    cfg: Config,
    tasks: list[str],
    seed: int,
    episodes: list[int],
    zero_descriptor: bool = False,
    mode: str = "mask",
    zero_history: bool = False,
) -> list[Any]:
    """PPO trained by replay on ``tasks`` with uniformly drawn preferences: a
    :class:`~memrl.agents.policy.Policy` snapshot after each count of ``episodes`` (a sequential
    episode is one mask decided group by group; a search episode evaluates ``env.budget`` masks).
    ``zero_descriptor`` hides the descriptor; ``zero_history`` hides a search's results."""
    import copy

    import gymnasium as gym
    from memrl.agents.policy import Policy
    from memrl.agents.ppo import build_ppo
    from memrl.envs.memcontrol import MemControlEnv
    from stable_baselines3.common.callbacks import BaseCallback

    train_cfg = cfg.with_changes(
        {
            "env.tasks": [t for t in cfg.env.tasks if t.get("name") in tasks],
            "env.preferences": "uniform",
            "env.mode": mode,
            "seed": seed,
            "ppo.total_timesteps": max(episodes),  # set to the steps trained below, once K is known
        },
    )
    env: Any = MemControlEnv(train_cfg)
    steps_per_episode = {"mask": 1, "search": train_cfg.env.budget}.get(mode, env.k + 1)
    train_cfg = train_cfg.with_changes({"ppo.total_timesteps": steps_per_episode * max(episodes)})
    env.zero_history, env.zero_descriptor = zero_history, zero_descriptor
    if zero_descriptor and mode != "search":  # search mode sees the descriptor through its prior
        width = len(descriptor_fields(env.k))
        env = gym.wrappers.TransformObservation(
            env, lambda o: _zero_descriptor(o, width), env.observation_space
        )

    class Episodes(BaseCallback):
        target, done = 0, 0

        def _on_step(self) -> bool:
            self.done += int(sum(self.locals["dones"]))
            return self.done < self.target

    model, counter, out = build_ppo(train_cfg, env), Episodes(), []
    for target in sorted(episodes):
        counter.target = target
        model.learn(steps_per_episode * (target - counter.done), callback=counter, reset_num_timesteps=False)
        snapshot = Policy.of_model(model, train_cfg, env.unwrapped.prior if mode == "search" else None)
        out.append(dataclasses.replace(snapshot, network=copy.deepcopy(model.policy)))
    return out


def _zero_descriptor(obs: np.ndarray, width: int) -> np.ndarray:
    """The observation with its descriptor part (the first ``width`` entries) zeroed."""
    out = obs.copy()
    out[:width] = 0
    return out
