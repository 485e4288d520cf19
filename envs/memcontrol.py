"""MemControl-v0: choose which UNet modules to fine-tune; the reward trades memorization for quality."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memrl.config import Config, load_config
from memrl.data.descriptor import DESCRIPTOR_FIELDS, describe
from memrl.evaluate import EvalSpec, Evaluation, Evaluator, TaskContext
from memrl.reward import References, Reward
from memrl.search_space import SearchSpace
from memrl.store import EvaluationStore

log = logging.getLogger(__name__)


def architecture_space(cfg: Config) -> SearchSpace:
    """The search space read off the base UNet's architecture alone (no weights, no training)."""
    import torch
    from diffusers import UNet2DConditionModel

    if cfg.model.path is None:
        from memrl.models import build_unet

        with torch.device("meta"):
            unet = build_unet(cfg)
    else:
        folder = Path(cfg.model.path)
        folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    return SearchSpace(unet, cfg.search.granularity, cfg.search.method)


class MemControlEnv(gym.Env):
    """
    ## Description
    Each episode is one dataset (a task): a small private image set to fine-tune a diffusion
    UNet on. The agent chooses which UNet module groups to unfreeze (MemControl, Dutt et al.,
    WACV 2025). The environment then runs a real short fine-tune of a fresh copy of the base
    UNet with only those groups trainable, samples images, and scores memorization of the
    private set (and of its duplicated canaries) and generation quality. Evaluations are cached
    by spec hash in an EvaluationStore, so a repeated mask costs nothing.

    ## Action Space
    * ``env.mode=mask``: ``MultiBinary(K)``, the whole mask at once; one step per episode.
    * ``env.mode=sequential``: ``Discrete(2)`` per group in order (0 keep frozen, 1 unfreeze),
      ``Discrete(3)`` with ``env.stop_action`` (2 = freeze the rest and finish). With
      ``env.max_groups`` the episode ends once that many groups are unfrozen.
    K is the number of groups of the base UNet at ``search.granularity`` (4 on the test config,
    7 on the default, 16 on Stable Diffusion 1.5 at ``transformer``).

    ## Observation Space
    ``Box`` of the dataset descriptor (12 values, see ``memrl.data.descriptor.DESCRIPTOR_FIELDS``,
    each roughly in [0, 1]); sequential mode appends the partial mask (K) and a one-hot of the
    current group (K).

    ## Rewards
    ``memrl.reward.Reward``: minus the normalised memorization term (0 = base model, 1 = every
    group fine-tuned, i.e. the mask of ones) minus the normalised quality cost (0 = mask of ones,
    1 = no fine-tuning) minus an optional parameter cost. Both references score -1. A failed
    evaluation scores ``reward.failure_penalty`` with the reason in ``info["error"]``.
    Sequential mode rewards 0 until the last step.

    ## Starting State
    ``reset`` draws a task from ``env.tasks`` (variants of ``data``) with the seeded generator;
    ``reset(options={"dataset": i})`` forces task ``i`` (or a dict of ``data`` overrides, or a
    data source path). No fine-tuning happens in ``reset`` (the base model and encoder are built
    once per task and cached).

    ## Episode End
    Mask mode: after the single step. Sequential mode: after the last group, a stop action, or
    when the budget ``env.max_groups`` is spent. Never truncated.

    ## Arguments
    ``gym.make("MemControl-v0", config="default", overrides=None, render_mode=None)``:
    ``config`` is a name from ``configs/`` (``default``, ``test``), a YAML path, or a Config;
    ``overrides`` a dict or ``["section.field=value"]`` list.

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
        self.tasks = [dict(t) for t in self.cfg.env.tasks] or [{}]
        e = self.cfg.env
        self.sequential = e.mode == "sequential"
        n_desc = len(DESCRIPTOR_FIELDS)
        if self.sequential:
            self.action_space = spaces.Discrete(3 if e.stop_action else 2)
            n_obs = n_desc + 2 * self.k
        else:
            self.action_space = spaces.MultiBinary(self.k)
            n_obs = n_desc
        self.observation_space = spaces.Box(-10.0, 10.0, shape=(n_obs,), dtype=np.float32)
        self.store = EvaluationStore(e.store)
        fallback = "inprocess" if e.backend == "replay" and e.replay_fallback else None
        self.evaluator = Evaluator(self.store, e.backend, fallback=fallback)
        self._task_cfg: Config | None = None
        self._descriptor = np.zeros(n_desc, dtype=np.float32)
        self._mask = np.zeros(self.k, dtype=np.int8)
        self._position = 0
        self._last: Evaluation | None = None
        self._descriptors: dict[str, np.ndarray] = {}

    # -- tasks -------------------------------------------------------------------------------
    def task_config(self, task: int | dict[str, Any] | str) -> Config:
        """The config of task ``task``: an index into ``env.tasks``, data overrides, or a source."""
        if isinstance(task, int | np.integer):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"dataset index {task} is outside 0..{len(self.tasks) - 1}")
            overrides = self.tasks[int(task)]
        elif isinstance(task, str):
            overrides = {"source": task}
        elif isinstance(task, dict):
            overrides = task
        else:
            raise ValueError(f"options['dataset']={task!r}: give an index, a dict or a path")
        return load_config(self.cfg, {f"data.{k}": v for k, v in overrides.items()})

    def context(self) -> TaskContext:
        if self._task_cfg is None:
            raise RuntimeError("call reset() before step()")
        return TaskContext.get(self._task_cfg)

    def descriptor(self, cfg: Config) -> np.ndarray:
        key = cfg.hash()
        if key not in self._descriptors:
            self._descriptors[key] = describe(TaskContext.get(cfg), cfg)
        return self._descriptors[key]

    @property
    def dataset_descriptor(self) -> np.ndarray:
        """The descriptor of the current task (set by ``reset``)."""
        return self._descriptor.copy()

    def references(self) -> References | str:
        """The no-fine-tune and mask-of-ones evaluations of the current task (cached in the
        store), or the reason one of them failed."""
        none = self._evaluate(np.zeros(self.k, dtype=np.int8))
        full = self._evaluate(np.ones(self.k, dtype=np.int8))
        if not (none.ok and full.ok):
            return f"reference evaluation failed: {none.error or full.error}"
        return References(none.metrics, full.metrics)

    def _evaluate(self, mask: np.ndarray) -> Evaluation:
        ctx = self.context()
        spec = EvalSpec.from_config(self._task_cfg, mask, ctx.fingerprints)
        return self.evaluator.evaluate(spec)

    # -- gym API -----------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        if not self.sequential:
            return self._descriptor.copy()
        onehot = np.zeros(self.k, dtype=np.float32)
        if self._position < self.k:
            onehot[self._position] = 1
        return np.concatenate([self._descriptor, self._mask.astype(np.float32), onehot])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        task = options.get("dataset", int(self.np_random.integers(len(self.tasks))))
        self._task_cfg = self.task_config(task)
        self._descriptor = np.clip(self.descriptor(self._task_cfg), -10, 10)
        self._mask = np.zeros(self.k, dtype=np.int8)
        self._position = 0
        return self._obs(), {
            "task": task if not isinstance(task, np.integer) else int(task),
            "dataset_fingerprint": self.context().fingerprints["data"],
        }

    def step(self, action):
        if self._task_cfg is None:
            raise RuntimeError("call reset() before step()")
        if self.sequential:
            if not self.action_space.contains(action):
                raise ValueError(f"action {action!r} is not in {self.action_space}")
            if int(action) == 2:
                self._position = self.k
            else:
                self._mask[self._position] = int(action)
                self._position += 1
            budget = self.cfg.env.max_groups
            if budget is not None and self._mask.sum() >= budget:
                self._position = self.k
            if self._position < self.k:
                return self._obs(), 0.0, False, False, {"mask": self._mask.tolist()}
            mask = self._mask
        else:
            mask = self.space.validate(action)
            self._mask = mask
        reward, info = self.evaluate_mask(mask)
        return self._obs(), reward, True, False, info

    def evaluate_mask(self, mask) -> tuple[float, dict[str, Any]]:
        """Reward and info of a whole mask on the current task, in either action mode."""
        mask = self.space.validate(mask)
        refs = self.references()
        result = self._evaluate(mask)
        self._last = result
        info: dict[str, Any] = {
            "mask": mask.tolist(),
            "groups": self.space.selected(mask),
            "cache_hit": result.cache_hit,
            "timings": result.timings,
            "ok": result.ok,
            "error": result.error,
            "metrics": dict(result.metrics),
        }
        if result.ok and isinstance(refs, str):
            info["ok"], info["error"] = False, refs
        if info["ok"]:
            reward_fn = Reward(self.cfg.reward, refs)
            reward = reward_fn(result.metrics)
            info.update(reward_fn.terms(result.metrics))
            info["trainable_percent"] = 100 * result.metrics["trainable_fraction"]
        else:
            reward = float(self.cfg.reward.failure_penalty)
        return float(reward), info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        from memrl.report import sample_grid

        if self._last is None or self._last.samples is None:
            side = self.cfg.data.resolution
            return np.zeros((side, 2 * side, 3), dtype=np.uint8)
        return sample_grid(self._last.samples, self._last.nearest, self.context().splits.private)
