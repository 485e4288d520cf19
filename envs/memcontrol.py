"""MemControl-v0: choose which UNet modules to fine-tune; the reward trades memorization for quality."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memrl.config import Config, load_config
from memrl.descriptor import descriptor_fields
from memrl.episode import (
    MAX_SEARCH_GROUPS,
    SearchHistory,
    all_masks,
    head,
    search_observation_size,
    sequential_finished,
    sequential_observation,
)
from memrl.errors import ConfigError, EpisodeOverError, NotInStoreError
from memrl.prior import PRIOR_FEATURES, TransferPrior
from memrl.render import sample_grid
from memrl.reward import PREFERENCE_FIELDS, draw_preference, preference_of, with_preference
from memrl.spec import Evaluation
from memrl.task import Outcome, Task, architecture_space, make_evaluator, suite, task_config

__all__ = ["MemControlEnv", "outcome_info"]

log = logging.getLogger(__name__)


def outcome_info(outcome: Outcome, task: Task) -> dict[str, Any]:
    """The step ``info`` of a scored mask: a function of the task and the mask only (no timings or
    cache hits, so a repeated seeded step gives the same info)."""
    metrics = {k: (v if math.isfinite(v) else None) for k, v in outcome.evaluation.metrics.items()}
    info: dict[str, Any] = {
        "mask": outcome.mask.tolist(),
        "groups": task.space.selected(outcome.mask),
        "ok": outcome.ok,
        "error": outcome.error,
        "metrics": metrics,
        **outcome.terms,
    }
    if outcome.ok:
        info["trainable_percent"] = 100 * outcome.evaluation.metrics["trainable_fraction"]
    return info


class MemControlEnv(gym.Env):
    """
    ## Description
    Each episode is one dataset (a task): a small private image set to fine-tune a diffusion
    UNet on. The agent chooses which UNet module groups to unfreeze (MemControl, Dutt et al.,
    WACV 2025). The environment then runs a real short fine-tune of a fresh copy of the base
    UNet with only those groups trainable, samples images, and scores memorization of the
    private set (and of its duplicated canaries) and generation quality. Evaluations are cached
    by spec hash (in shipped tables and an EvaluationStore), so a repeated mask costs nothing.
    The env is a thin adapter: the work is done by :class:`memrl.task.Task`.

    ## Action Space
    * ``env.mode=mask``: ``MultiBinary(K)``, the whole mask at once; one step per episode.
    * ``env.mode=sequential``: ``Discrete(2)`` per group in order (0 keep frozen, 1 unfreeze),
      ``Discrete(3)`` with ``env.stop_action`` (2 = freeze the rest and finish). With
      ``env.max_groups`` the episode ends once that many groups are unfrozen.
    * ``env.mode=search``: ``Discrete(2**K)`` each step (a mask's index in counting order,
      ``memrl.episode.all_masks``), ``env.budget`` steps per episode: a search of one task and
      preference that sees every result so far (``memrl.episode``; K at most 10).
    * ``env.mode=control``: acting during one fine-tune (``MultiBinary(K + 1)``, groups and stop):
      :class:`memrl.envs.control.ControlEnv`, which ``gym.make`` returns for that mode.
    K is the number of groups of the base UNet at ``search.granularity`` (4 on the test config,
    7 on the default, 16 on Stable Diffusion 1.5 at ``transformer``).

    ## Observation Space
    ``Box`` of the dataset descriptor (version 2: 17 + 2K values, see
    ``memrl.descriptor.descriptor_fields``, each roughly in [0, 1]) and the episode's
    preference (3 reward weights: ``memrl.reward.PREFERENCE_FIELDS``); sequential mode appends the
    partial mask (K) and a one-hot of the current group (K). Search mode observes instead
    ``memrl.episode.SEARCH_GLOBALS`` and, for every mask, ``CANDIDATE_FEATURES``: the training
    tasks' regret of it weighted by descriptor distance (``env.prior``, ``memrl.prior``), whether
    it was tried, and a Gaussian-process posterior from the results so far.

    ## Rewards
    ``memrl.reward.Reward``: minus the normalised memorization term (0 = base model, 1 = every
    group fine-tuned, i.e. the mask of ones) minus the normalised quality cost (0 = mask of ones,
    1 = no fine-tuning) minus an optional parameter cost, weighted by the episode's preference
    (``env.preferences``: the config's weights, or drawn per episode; computed from the stored
    terms, so another preference costs no fine-tune); version 2 floors the memorization term at 0
    and widens its span to 3 seed standard deviations where the tables measured them. A failed
    evaluation scores ``reward.failure_penalty`` with the reason in ``info["error"]``.
    Sequential mode rewards 0 until the last step. Search mode rewards the change of the best
    reward among the masks tried (the first step: its reward minus the better reference's), so an
    episode's rewards sum to its best mask's gain over the references; a repeated mask brings 0.
    ``info`` depends only on the task and the action; run diagnostics (cache hits, timings) are in
    ``env.diagnostics``.

    ## Starting State
    ``reset`` draws a task from the training tasks of ``env.tasks`` (those not marked
    ``heldout``; on replay of a table, only those it completes) with the seeded generator;
    ``reset(options={"dataset": d})`` forces one: an index
    or name into ``env.tasks`` (held-out ones included), a dict of ``data`` overrides, or a data
    source path; ``options={"preference": [w_mem, w_quality, w_param]}`` forces the weights. No
    fine-tuning happens in ``reset``, except in search mode, which evaluates the two references
    first (a live search needs them to score anything).

    ## Episode End
    Mask mode: after the single step. Sequential mode: after the last group, a stop action, or
    when the budget ``env.max_groups`` is spent. Never truncated. Stepping a finished episode
    raises :class:`memrl.errors.EpisodeOverError`: call ``reset()``.

    ## Arguments
    ``gym.make("MemControl-v0", config="default", overrides=None, render_mode=None)``:
    ``config`` is a name from ``configs/`` (``default``, ``test``, ``bench``), a YAML path, or a
    Config; ``overrides`` a dict or ``["section.field=value"]`` list.

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        config: str | Path | Config | dict[str, Any] = "default",
        overrides: dict[str, Any] | list[str] | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = load_config(config, overrides)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; MemControl-v0 supports 'rgb_array'")
        self.render_mode = render_mode
        self.space = architecture_space(self.cfg)
        self.k = self.space.k
        self.evaluator = make_evaluator(self.cfg)
        self.tasks = [Task(e.cfg, self.evaluator, e.name, e.heldout) for e in suite(self.cfg)]
        self.train_tasks = [i for i, t in enumerate(self.tasks) if not t.heldout] or list(
            range(len(self.tasks))
        )
        e = self.cfg.env
        self.sequential = e.mode == "sequential"
        self.searching = e.mode == "search"
        n_desc = len(descriptor_fields(self.k)) + len(PREFERENCE_FIELDS)
        if self.sequential:
            self.action_space = spaces.Discrete(3 if e.stop_action else 2)
            n_obs = n_desc + 2 * self.k
        elif self.searching:
            if self.k > MAX_SEARCH_GROUPS:
                raise ConfigError(
                    f"env.mode=search scores every mask of the space, and this one has {self.k} groups "
                    f"(2**{self.k} masks); use at most {MAX_SEARCH_GROUPS} (search.granularity=block)"
                )
            self.action_space = spaces.Discrete(2**self.k)
            n_obs = search_observation_size(self.k)
        else:
            self.action_space = spaces.MultiBinary(self.k)
            n_obs = n_desc
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(n_obs,), dtype=np.float32)
        self.task: Task | None = None
        self.diagnostics: dict[str, Any] = {"cache_hit": None, "timings": {}}
        self._descriptor = np.zeros(len(descriptor_fields(self.k)), dtype=np.float32)
        self.preference = preference_of(self.cfg.reward)
        self._mask = np.zeros(self.k, dtype=np.int8)
        self._position = 0
        self._done = True
        self._last: Evaluation | None = None
        self.history = SearchHistory(self.k, e.budget)
        self._completeness: dict[int, bool] = {}
        self._prior: TransferPrior | None = None
        self._prior_features = np.zeros((2**self.k, len(PRIOR_FEATURES)))
        self.zero_history = False
        """Search mode: blank the history in observations (an ablation: does it use feedback?)."""
        self.zero_descriptor = False
        """Search mode: score the prior for a zero descriptor (an ablation: does it use the data?)."""

    @property
    def prior(self) -> TransferPrior:
        """Search mode: the training tasks whose tables are complete (what a search of a new task
        may know; each training task's own row is left out while it is the one searched)."""
        if self._prior is None:
            self._prior = TransferPrior.of_tasks(
                [self.tasks[i] for i in self.train_tasks if not self.tasks[i].heldout], self.cfg.reward
            )
        return self._prior

    def _select(self, dataset: Any) -> tuple[Any, Task]:
        if isinstance(dataset, int | np.integer):
            if not 0 <= dataset < len(self.tasks):
                raise ValueError(f"dataset index {dataset} is outside 0..{len(self.tasks) - 1}")
            return int(dataset), self.tasks[int(dataset)]
        names = [t.name for t in self.tasks]
        if isinstance(dataset, str) and dataset in names:
            return names.index(dataset), self.tasks[names.index(dataset)]
        if isinstance(dataset, str | dict):
            cfg = task_config(self.cfg, dataset)
            if architecture_space(cfg).signature != self.space.signature:
                raise ValueError(
                    f"dataset {dataset!r} changes the search space; keep data.resolution/channels"
                )
            return dataset, Task(cfg, self.evaluator)
        raise ValueError(
            f"options['dataset']={dataset!r}: give an index or name of env.tasks, a dict or a path"
        )

    def _replays_only(self) -> bool:
        """Replay of a table with no live fallback: draw only the tasks the table completes."""
        e = self.cfg.env
        return e.backend == "replay" and bool(e.table) and not e.replay_fallback

    def _complete(self, index: int) -> bool:
        """Whether every mask of training task ``index`` is stored (replay draws only those)."""
        if index not in self._completeness:
            task = self.tasks[index]
            masks = itertools.product((0, 1), repeat=self.k)
            self._completeness[index] = all(
                self.evaluator.lookup(task.context.spec(m).hash) is not None for m in masks
            )
            if not self._completeness[index]:
                log.warning("task %s is not complete in the tables; replay leaves it out", task.name)
        return self._completeness[index]

    def _draw_task(self) -> int:
        """A training task drawn uniformly (on replay, among those whose table is complete)."""
        order = self.np_random.permutation(len(self.train_tasks))
        for i in order:
            label = self.train_tasks[int(i)]
            if not self._replays_only() or self._complete(label):
                return label
        raise NotInStoreError(
            "no training task of env.tasks has a complete table; continue it with python -m memrl.tables "
            "build, or set env.replay_fallback=true to fine-tune what it lacks"
        )

    @property
    def dataset_descriptor(self) -> np.ndarray:
        """The descriptor of the current task (set by ``reset``)."""
        return self._descriptor.copy()

    def _obs(self) -> np.ndarray:
        first = head(self._descriptor, self.preference)
        if self.sequential:
            return sequential_observation(first, self._mask, self._position)
        if self.searching:
            return self.history.observation(self.preference, self._prior_features, self.zero_history)
        return first

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "dataset" in options:
            label, self.task = self._select(options["dataset"])
        else:
            label = self._draw_task()
            self.task = self.tasks[label]
        self._descriptor = np.clip(self.task.descriptor(), -10, 10).astype(np.float32)
        if "preference" in options:
            self.preference = preference_of(with_preference(self.cfg.reward, options["preference"]))
        else:
            self.preference = draw_preference(self.cfg.reward, self.cfg.env.preferences, self.np_random)
        self._mask = np.zeros(self.k, dtype=np.int8)
        self._position, self._done = 0, False
        self.history = SearchHistory(self.k, self.cfg.env.budget)
        if self.searching:
            self._start_search()
        return self._obs(), {
            "task": label,
            "task_name": self.task.name,
            "preference": self.preference.tolist(),
            "dataset_fingerprint": self.task.context.fingerprints["data"],
        }

    def step(self, action):
        if self.task is None or self._done:
            raise EpisodeOverError("the episode is over (or never started): call reset() before step()")
        if self.sequential:
            if not self.action_space.contains(action):
                raise ValueError(f"action {action!r} is not in {self.action_space}")
            if int(action) == 2:
                self._position = self.k
            else:
                self._mask[self._position] = int(action)
                self._position += 1
            if not sequential_finished(self._mask, self._position, self.cfg.env.max_groups):
                return self._obs(), 0.0, False, False, {"mask": self._mask.tolist()}
            mask = self._mask
        elif self.searching:
            return self._search_step(action)
        else:
            mask = self.task.space.validate(action)
            self._mask = mask
        self._done = True
        outcome = self.task.score(mask, with_preference(self.cfg.reward, self.preference))
        self._last = outcome.evaluation
        self.diagnostics = {"cache_hit": outcome.evaluation.cache_hit, "timings": outcome.evaluation.timings}
        return self._obs(), float(outcome.reward), True, False, outcome_info(outcome, self.task)

    def _start_search(self) -> None:
        """Search mode, in ``reset``: the prior's scores for this task (its own row left out)
        and the references' rewards (evaluated first, as a live search does)."""
        assert self.task is not None
        prior = self.prior
        descriptor = np.zeros_like(self._descriptor) if self.zero_descriptor else self._descriptor
        exclude = prior.names.index(self.task.name) if self.task.name in prior.names else None
        self._prior_features = prior.features(descriptor, self.preference, exclude)
        self.history.sources = prior.weighted_sources(descriptor, self.preference, exclude)
        reward_cfg = with_preference(self.cfg.reward, self.preference)
        try:
            references = self.task.reference_rewards(reward_cfg)
        except RuntimeError as exc:
            log.warning("search on %s without its references: %s", self.task.name, exc)
        else:
            self.history.references = (float(references[0]), float(references[1]))

    def _search_action(self, action: Any) -> np.ndarray:
        if not self.action_space.contains(action):
            raise ValueError(
                f"action {action!r} is not in {self.action_space}: a search step takes a mask's index "
                "in counting order (memrl.episode.all_masks)"
            )
        return all_masks(self.k)[int(action)]

    def _search_step(self, action: Any):
        """Search mode: evaluate the mask; the reward is the change of the best tried reward."""
        assert self.task is not None
        mask = self._search_action(action)
        reward_cfg = with_preference(self.cfg.reward, self.preference)
        outcome = self.task.score(mask, reward_cfg)
        value = outcome.reward if outcome.ok else -np.inf
        terms = (outcome.terms.get("memorization_term", 0.0), outcome.terms.get("quality_term", 0.0))
        improvement = self.history.add(mask, value, *terms)
        self._mask, self._last = mask, outcome.evaluation
        self._done = self.history.done
        self.diagnostics = {"cache_hit": outcome.evaluation.cache_hit, "timings": outcome.evaluation.timings}
        best = self.history.best_index()
        info = {
            **outcome_info(outcome, self.task),
            "mask_reward": float(outcome.reward),
            "best_reward": self.history.best_reward,
            "best_mask": None if best is None else self.history.masks[best].tolist(),
            "budget_left": self.history.budget - len(self.history.masks),
        }
        return self._obs(), float(improvement), self._done, False, info

    def pending_mask(self, action: Any) -> np.ndarray | None:
        """The mask ``step(action)`` would evaluate, or None when that step does not end the
        episode (a vector env uses it to run several evaluations at once)."""
        if self.task is None or self._done:
            return None
        if self.searching:
            return self._search_action(action)
        if not self.sequential:
            return self.task.space.validate(action)
        mask = self._mask.copy()
        if int(action) == 2:
            return mask
        mask[self._position] = int(action)
        return mask if sequential_finished(mask, self._position + 1, self.cfg.env.max_groups) else None

    def render(self):
        if self.render_mode != "rgb_array":
            return None

        last = self._last
        if last is None or last.samples is None or last.nearest is None or self.task is None:
            side = self.cfg.data.resolution
            return np.zeros((side, 2 * side, 3), dtype=np.uint8)
        return sample_grid(last.samples, last.nearest, self.task.context.splits.private)
