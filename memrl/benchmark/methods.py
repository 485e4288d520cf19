"""The methods under test. Each returns the table indices of the masks it tries on the test task,
in order (its first is its zero-shot proposal)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memrl.benchmark.table import BenchTable, mask_index
from memrl.config import Config, load_config
from memrl.descriptor import descriptor_fields, family_slices
from memrl.prior import KNN, TransferPrior


def _ranked(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` lowest finite ``scores`` (ties by index)."""
    order = np.argsort(np.where(np.isfinite(scores), scores, np.inf), kind="stable")
    return [int(i) for i in order[:n] if np.isfinite(scores[i])]


def single_best(table: BenchTable, train: list[int], w: float) -> int:
    """The mask with the lowest mean normalised regret over the training tasks: chosen on the
    scale methods are judged on (masks missing anywhere skipped)."""
    return _ranked(table.regret(w)[train].mean(axis=0), 1)[0]


def single_best_reward(table: BenchTable, train: list[int], w: float) -> int:
    """The mask with the best mean *raw* reward over the training tasks (tasks with wide reward
    ranges dominate it; kept, labelled, for comparison with the first benchmark)."""
    return _ranked(-table.rewards(w)[train].mean(axis=0), 1)[0]


def prior_of(table: BenchTable, train: list[int]) -> TransferPrior:
    """The training tasks' rows as a :class:`~memrl.prior.TransferPrior` (what the search policy
    sees; the nearest-task baselines below read the same one)."""
    return TransferPrior([table.names[t] for t in train], table.descriptors[train], table.terms[train])


def task_distances(table: BenchTable, train: list[int], test: int) -> np.ndarray:
    """Euclidean distances from the test task's descriptor to each training task's, features
    standardised with the training tasks' mean and standard deviation only (constant features
    dropped)."""
    prior = prior_of(table, train)
    return prior.distances(table.descriptors[test], list(range(prior.size)))


def nearest_task(table: BenchTable, train: list[int], test: int, w: float, n: int) -> list[int]:
    """The ``n`` best masks of the training task nearest to the test task (descriptor distance)."""
    nearest = train[int(np.argmin(task_distances(table, train, test)))]
    return _ranked(table.regret(w)[nearest], n)


def knn_tasks(table: BenchTable, train: list[int], test: int, w: float, n: int, k: int = KNN) -> list[int]:
    """The ``n`` masks with the lowest regret averaged over the ``k`` nearest training tasks,
    weighted by inverse descriptor distance."""
    prior = prior_of(table, train)
    return _ranked(prior.knn_regret(table.descriptors[test], table.preference(w), k), n)


def portfolio(table: BenchTable, train: list[int], w: float, n: int) -> list[int]:
    """A static portfolio built greedily on the training tasks (as Auto-sklearn 2 builds its
    portfolios): each next mask is the one that most lowers the mean over training tasks of the
    best regret among the masks chosen so far. Its first ``n`` masks, in that order."""
    regret = table.regret(w)[train]
    chosen: list[int] = []
    best = np.full(len(train), np.inf)
    for _ in range(n):
        candidate = np.minimum(best[:, None], regret).mean(axis=0)
        candidate[chosen] = np.inf
        pick = _ranked(candidate, 1)[0]
        chosen.append(pick)
        best = np.minimum(best, regret[:, pick])
    return chosen


def gradient_top_g(table: BenchTable, train: list[int], test: int, w: float) -> int:
    """Gradient-based parameter selection as a zero-shot rule (GPS, Zhang et al. CVPR 2024): the
    ``g`` groups with the largest base-model gradient per parameter on the private set (from the
    descriptor), ``g`` chosen as the count with the lowest mean regret on the training tasks."""
    k = table.masks.shape[1]
    sensitivity = table.descriptors[:, family_slices(k)["gradient"]][:, :k]

    def mask_of(t: int, g: int) -> int:
        mask = np.zeros(k, dtype=np.int8)
        mask[np.argsort(-sensitivity[t], kind="stable")[:g]] = 1
        return mask_index(mask)

    regret = table.regret(w)
    mean = [np.mean([regret[t, mask_of(t, g)] for t in train]) for g in range(k + 1)]
    return mask_of(test, int(np.nanargmin(mean)))


def prior_gp_search(table: BenchTable, train: list[int], test: int, w: float, budget: int) -> list[int]:
    """Bayesian optimisation whose prior mean is what transfers (no learning): the search policy's
    :func:`~memrl.episode.calibrated_posterior` (an affine map from the training tasks' regret,
    weighted by descriptor distance (:meth:`~memrl.prior.TransferPrior.weighted_sources`), to the
    test task's reward and a Gaussian process on the residuals, refitted after every result); the
    first pick is the best predicted mask, the next :data:`~memrl.episode.PORTFOLIO_STEPS` the
    best completion of the tried ones as a portfolio (:func:`~memrl.prior.portfolio_regret`), each
    later one the largest expected improvement over the best so far; ties go to the lowest prior
    regret, and the training tasks are re-weighted by how well they order the results so far
    (:func:`~memrl.prior.agreement_weights`), the references' included.
    The references (no fine-tune, the mask of ones) are observed first, as the search policy
    observes them, so even the first pick knows which training tasks order them as this one does."""
    from memrl.episode import best_candidate, calibrated_posterior, expected_improvement, portfolio_step
    from memrl.prior import agreement_regret, all_masks, portfolio_regret

    rewards = table.rewards(w)[test]
    sources = prior_of(table, train).weighted_sources(table.descriptors[test], table.preference(w))
    transfer = np.nan_to_num(agreement_regret(*sources, [], np.zeros(0)), nan=1.0)  # nothing seen yet
    candidates = all_masks(table.masks.shape[1])
    available = np.isfinite(rewards)
    tried: list[int] = []
    for _ in range(min(budget, int(available.sum()))):
        seen = [i for i in dict.fromkeys([0, len(rewards) - 1, *tried]) if available[i]]
        values = rewards[seen]
        if portfolio_step(len(tried), sources):
            score = -portfolio_regret(*sources, tried, seen, values)
        else:
            prior = np.nan_to_num(agreement_regret(*sources, seen, values), nan=1.0)
            mean, std, _ = calibrated_posterior(prior, seen, values, candidates)
            score = expected_improvement(mean, std, float(values.max())) if tried else mean.copy()
        score[~available] = -np.inf
        score[tried] = -np.inf
        tried.append(best_candidate(score, transfer))
    return tried


def random_search(table: BenchTable, test: int, budget: int, rng: np.random.Generator) -> list[int]:
    """``budget`` distinct stored masks in a random order (a smaller budget is a prefix)."""
    available = np.flatnonzero(np.isfinite(table.terms[test, :, 0]))
    return [int(i) for i in rng.permutation(available)[:budget]]


def optuna_search(
    table: BenchTable,
    test: int,
    w: float,
    budget: int,
    seed: int,
    sampler: str = "tpe",
    warm: list[int] | None = None,
) -> list[int]:
    """Masks an Optuna sampler (``tpe``, ``gp``, or ``nsga2`` on the two terms) tries on the test
    task, in order; a missing or failed mask scores the failure penalty. ``warm``: masks enqueued
    as the first trials (a warm start from what transfers)."""
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
    for index in warm or []:
        study.enqueue_trial({f"g{j}": int(v) for j, v in enumerate(table.masks[index])})
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

ONE_SHOT_PPO = {"ppo.learning_rate": 3e-3}
"""The one-shot (mask mode) policy's recipe, over ``cfg.ppo`` (which is the shipped search
policy's): ``tune --method ppo`` chose 3e-3 with 10,000 episodes (bench/results/benchmark/
tune-ppo.md), where ``tune`` searches the search policy at 3e-4."""


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


REGRESSION_ITERATIONS = 50
REGRESSION_LEARNING_RATE = 0.03
"""The regression's boosting settings, as ``python -m memrl.benchmark tune --method regression``
chose them on the training tasks (bench/results/benchmark/tune-regression.md, 2026-12-01, 8
tasks: 50 trees at 0.03, mean regret over 1-4 fine-tunes 0.185; on 7 tasks it had chosen 50 at
0.1, 0.056, against 0.099 for the 200 used before)."""


def regression_model(
    table: BenchTable,
    train: list[int],
    seed: int,
    iterations: int = REGRESSION_ITERATIONS,
    learning_rate: float = REGRESSION_LEARNING_RATE,
) -> Any:
    """A regression from (descriptor, preference, mask) to reward fit on ``train``'s rows at 11
    memorization weights (gradient boosting: ``iterations`` trees at ``learning_rate``)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    xs, ys = [], []
    for t in train:
        for weight in np.linspace(0, 1, 11):
            r = table.rewards(weight)[t]
            keep = np.isfinite(r)
            xs.append(_regression_features(table, t, weight)[keep])
            ys.append(r[keep])
    model = HistGradientBoostingRegressor(
        random_state=seed,
        max_iter=iterations,
        learning_rate=learning_rate,
        early_stopping=False,  # "auto" turns it on past 10,000 rows (8 tasks): a fit of another kind
    )
    return model.fit(np.concatenate(xs), np.concatenate(ys))


def _regression_features(table: BenchTable, t: int, weight: float) -> np.ndarray:
    n = len(table.masks)
    d = np.repeat(table.descriptors[t][None], n, 0)
    p = np.repeat(table.preference(weight)[None], n, 0)
    return np.concatenate([d, p, table.masks], axis=1)


def regression(table: BenchTable, model: Any, test: int, w: float, n: int = 1) -> list[int]:
    """The ``n`` masks of highest reward predicted by ``model`` (:func:`regression_model`)."""
    predicted = model.predict(_regression_features(table, test, w))
    predicted[~np.isfinite(table.terms[test, :, 0])] = np.nan
    return _ranked(-predicted, n)


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
            "ppo.total_timesteps": max(episodes),  # set to the steps trained below, once K is known
        },
    )
    env: Any = MemControlEnv(train_cfg)
    steps_per_episode = {"mask": 1, "search": train_cfg.env.budget}.get(mode, env.k + 1)
    train_cfg = load_config(train_cfg, {"ppo.total_timesteps": steps_per_episode * max(episodes)})
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
    table (the references' rewards give its baseline, as they would live)."""
    rewards, terms = table.rewards(w)[test], table.terms[test]
    descriptor = np.zeros_like(table.descriptors[test]) if zero_descriptor else table.descriptors[test]

    def evaluate(mask: np.ndarray) -> tuple[float, float, float]:
        i = mask_index(mask)
        return float(rewards[i]), float(terms[i, 0]), float(terms[i, 1])

    references = (float(rewards[0]), float(rewards[-1]))
    history = policy.search(
        descriptor, evaluate, budget, table.preference(w), references=references, zero_history=zero_history
    )
    return [mask_index(m) for m in history.masks]


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
