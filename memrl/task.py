"""Tasks: what every evaluation of one dataset shares, and the evaluation service built on it.

* :class:`TaskContext`: the splits, the search space, the fingerprints, and (built when first
  needed) the base model, the encoder, the FAISS index over training embeddings and the copy
  threshold. ``ctx.spec(mask)`` is the EvalSpec of a mask on this task.
* :class:`Task`: the service every caller uses (the Gymnasium env, the search baselines,
  ``apply_policy``, ``Policy.propose``, ``train_agent``): its config, its references, its reward,
  ``score(mask)``, and its descriptor.
* :func:`suite`: the tasks of a config's ``env.tasks`` (name, held-out flag, config).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memrl.config import Config, load_config, task_overrides
from memrl.errors import ModelError
from memrl.reward import References, Reward
from memrl.search_space import SearchSpace
from memrl.spec import SPEC_SECTIONS, EvalSpec, Evaluation
from memrl.tables import NOISE_SEEDS, noise_masks
from memrl.utils import stable_hash

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=32)
def _architecture_space(
    model_path: str | None, model_json: str, resolution: int, channels: int, granularity: str, method: str
) -> SearchSpace:
    import json

    import torch
    from diffusers import UNet2DConditionModel

    if model_path is None:
        from memrl.models import build_unet

        cfg = load_config(
            {"model": json.loads(model_json), "data": {"resolution": resolution, "channels": channels}}
        )
        with torch.device("meta"):
            unet = build_unet(cfg)
    else:
        folder = Path(model_path)
        folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model.path={model_path!r}: no diffusers UNet here (expected config.json in it or in "
                "its unet/ folder); point model.path at a folder written by save_pretrained"
            )
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    return SearchSpace(unet, granularity, method)


def architecture_space(cfg: Config) -> SearchSpace:
    """The task's search space, read off the base UNet's architecture (no weights, no training)."""
    import json

    return _architecture_space(
        cfg.model.path,
        json.dumps(cfg.model.__dict__, sort_keys=True),
        cfg.data.resolution,
        cfg.data.channels,
        cfg.search.granularity,
        cfg.search.method,
    )


class TaskContext:
    """What every evaluation of one task shares. Build with :meth:`get` (cached per settings).

    Cheap parts are built at once (splits, search space, fingerprints); the base model, encoder,
    index and threshold when first used, so a replayed task never trains an encoder.
    """

    _cache: dict[str, TaskContext] = {}

    def __init__(self, cfg: Config) -> None:
        from memrl.data import load_splits

        self.cfg = cfg
        self.splits = load_splits(cfg.data)
        self.space = architecture_space(cfg)

    @classmethod
    def get(cls, cfg: Config) -> TaskContext:
        tree = cfg.to_dict()
        key = stable_hash({k: tree[k] for k in SPEC_SECTIONS})
        if key not in cls._cache:
            cls._cache[key] = cls(cfg)
        return cls._cache[key]

    @functools.cached_property
    def sd(self) -> Any:
        """The Stable Diffusion components when ``model.path`` is a pipeline folder, else None."""
        from memrl.models.stable_diffusion import is_pipeline_folder, load_components

        if not is_pipeline_folder(self.cfg.model.path):
            return None
        return load_components(str(Path(str(self.cfg.model.path)).resolve()))

    @functools.cached_property
    def prompts(self) -> list[str]:
        """Stable Diffusion path: the task's distinct captions, then the empty prompt (null label)."""
        from memrl.models.stable_diffusion import captions_of

        template = self.cfg.data.caption_template
        seen = [
            c
            for part in (self.splits.base, self.splits.private, self.splits.heldout)
            for c in captions_of(part, template)
        ]
        return [*dict.fromkeys(c for c in seen if c), ""]

    @functools.cached_property
    def model_splits(self) -> Any:
        """The splits the model trains and is scored on: the images themselves, or on the Stable
        Diffusion path their VAE latents, labelled by caption (an index into :attr:`prompts`)."""
        import dataclasses

        import torch

        from memrl.data import ImageSet
        from memrl.models.stable_diffusion import captions_of, encode_latents

        if self.sd is None:
            return self.splits
        index = {p: i for i, p in enumerate(self.prompts)}
        null = len(self.prompts) - 1

        def latent(part: Any) -> Any:
            ids = [index.get(c, null) for c in captions_of(part, self.cfg.data.caption_template)]
            return ImageSet(
                encode_latents(self.sd, part.images),
                torch.tensor(ids),
                None,
                part.name,
                {**part.meta, "latents": self.sd.vae_fingerprint},
            )

        s = self.splits
        return dataclasses.replace(
            s, base=latent(s.base), private=latent(s.private), heldout=latent(s.heldout)
        )

    def to_images(self, samples: Any) -> Any:
        """Model outputs as images in [-1, 1] (decoded through the VAE on the Stable Diffusion path)."""
        if self.sd is None:
            return samples
        from memrl.models.stable_diffusion import decode_latents

        return decode_latents(self.sd, samples)

    @functools.cached_property
    def base(self) -> Any:
        """The base model (shipped, cached, pretrained once, or a pipeline's UNet conditioned on
        the task's prompts); checked against the search space."""
        from memrl.models import get_base_model

        if self.sd is not None:
            import json

            from memrl.models.stable_diffusion import TextConditionedModel, encode_prompts

            model: Any = TextConditionedModel(
                self.sd.unet, encode_prompts(self.sd, self.prompts), self.sd.path
            )
            config = self.sd.path / "scheduler" / "scheduler_config.json"
            model.scheduler_config = json.loads(config.read_text()) if config.is_file() else None
        else:
            model = get_base_model(self.cfg, self.splits)
        loaded = SearchSpace(model.unet, self.space.granularity, self.space.method)
        if loaded.signature != self.space.signature:
            raise ModelError(
                f"the base model's architecture ({loaded.k} groups) differs from the one its config "
                f"describes ({self.space.k} groups); delete the cached model or fix model.*"
            )
        return model

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Fingerprints of the inputs that are not settings: data, base-model weights, search space."""
        from memrl.models.base import shipped_fingerprint

        base = shipped_fingerprint(self.cfg, self.splits) if self.cfg.model.path is None else None
        if self.sd is not None:
            base = self.sd.fingerprint
        return {
            "data": self.splits.fingerprint,
            "base_model": base or self.base.fingerprint(),
            "search_space": self.space.signature,
        }

    def spec(self, mask: Any) -> EvalSpec:
        """The EvalSpec of ``mask`` (validated against the search space) on this task."""
        return EvalSpec.from_config(self.cfg, self.space.validate(mask), self.fingerprints)

    @functools.cached_property
    def encoder(self) -> Any:
        from memrl.encoders import get_encoder

        return get_encoder(self.cfg, self.splits)

    @functools.cached_property
    def train_embeddings(self) -> Any:
        from memrl.encoders import embed

        return embed(self.encoder, self.splits.private)

    @functools.cached_property
    def heldout_embeddings(self) -> Any:
        from memrl.encoders import embed

        return embed(self.encoder, self.splits.heldout)

    @functools.cached_property
    def index(self) -> Any:
        from memrl.metrics.memorization import NearestNeighbourIndex

        m = self.cfg.metrics
        return NearestNeighbourIndex(self.train_embeddings, m.index, m.faiss_index)

    @functools.cached_property
    def threshold(self) -> float:
        from memrl.metrics.memorization import copy_threshold

        return copy_threshold(self.index, self.heldout_embeddings, self.cfg.metrics.copy_quantile)


@dataclass
class Outcome:
    """A mask scored on a task: reward, normalised terms and the raw evaluation."""

    mask: np.ndarray
    reward: float
    evaluation: Evaluation
    terms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Task:
    """The evaluation service of one task: config, references, reward, score a mask, descriptor.

    Args:
        cfg: the task's config (``data`` already set to this task).
        evaluator: where evaluations are looked up and run (:class:`memrl.backends.Evaluator`).
        name: a label; heldout: never trained on (kept to test transfer).
    """

    def __init__(self, cfg: Config, evaluator: Any, name: str = "", heldout: bool = False) -> None:
        self.cfg, self.evaluator, self.name, self.heldout = cfg, evaluator, name, heldout
        self._references: References | None = None
        self._descriptor: np.ndarray | None = None

    @functools.cached_property
    def context(self) -> TaskContext:
        return TaskContext.get(self.cfg)

    @property
    def space(self) -> SearchSpace:
        return self.context.space

    def evaluate(self, mask: Any) -> Evaluation:
        """The evaluation of ``mask`` (from a table or store, or run now)."""
        return self.evaluator.evaluate(self.context.spec(mask))

    def specs_with_references(self, masks: list[Any]) -> list[EvalSpec]:
        """The specs of the references and of ``masks``: what scoring them needs evaluated."""
        k = self.space.k
        return [self.context.spec(m) for m in (np.zeros(k, np.int8), np.ones(k, np.int8), *masks)]

    def prefetch(self, masks: list[Any]) -> None:
        """Evaluate ``masks`` and the references at once (concurrently on the Ray backend), so
        that scoring them afterwards only reads stored evaluations."""
        self.evaluator.evaluate_many(self.specs_with_references(masks))

    def references(self) -> References:
        """No fine-tune (mask of zeros) and every group (mask of ones); raises RuntimeError naming
        the failed one."""
        if self._references is None:
            k = self.space.k
            none, full = self.evaluate(np.zeros(k, np.int8)), self.evaluate(np.ones(k, np.int8))
            for label, ev in (("no fine-tune", none), ("mask of ones", full)):
                if not ev.ok:
                    raise RuntimeError(f"the reference evaluation ({label}) failed: {ev.error}")
            self._references = References(none.metrics, full.metrics, self.seed_noise())
        return self._references

    def reference_rewards(self, reward: Any = None) -> tuple[float, float]:
        """Rewards of no fine-tune and of the mask of ones (``reward``: a RewardConfig, default
        the config's)."""
        refs = self.references()
        fn = Reward(reward or self.cfg.reward, refs)
        return fn(refs.none), fn(refs.full)

    def seed_noise(self) -> dict[str, float]:
        """Each metric's seed standard deviation on this task, pooled over the masks of the
        tables' noise sample stored with two or more fine-tune seeds (looked up, never evaluated;
        empty when there are none)."""
        k, fingerprints = self.space.k, self.context.fingerprints
        seeds = [self.cfg] + [load_config(self.cfg, {"finetune.seed": s}) for s in NOISE_SEEDS]
        variances: dict[str, list[float]] = {}
        for mask in noise_masks(k, min(2**k, 64)):
            found = [self.evaluator.lookup(EvalSpec.from_config(c, mask, fingerprints).hash) for c in seeds]
            runs = [ev.metrics for ev in found if ev is not None and ev.ok]
            if len(runs) < 2:
                continue
            for key in set.intersection(*(set(r) for r in runs)):
                values = np.array([r[key] for r in runs], dtype=float)
                if np.isfinite(values).all():
                    variances.setdefault(key, []).append(float(values.var(ddof=1)))
        return {key: float(np.sqrt(np.mean(v))) for key, v in variances.items()}

    def score(self, mask: Any, reward: Any = None) -> Outcome:
        """Reward (``reward``: a RewardConfig, default the config's) and terms of ``mask``.

        A failed evaluation or reference scores ``reward.failure_penalty`` with the reason in
        ``error``.
        """
        reward_cfg = reward or self.cfg.reward
        mask = self.space.validate(mask)
        evaluation = self.evaluate(mask)
        error = evaluation.error if not evaluation.ok else None
        terms: dict[str, float] = {}
        if error is None:
            try:
                reward_fn = Reward(reward_cfg, self.references())
            except RuntimeError as exc:
                error = str(exc)
            else:
                terms = reward_fn.terms(evaluation.metrics)
                return Outcome(mask, reward_fn(evaluation.metrics), evaluation, terms)
        return Outcome(mask, float(reward_cfg.failure_penalty), evaluation, terms, error)

    def descriptor_key(self) -> str:
        from memrl.data.descriptor import DESCRIPTOR_VERSION

        return stable_hash([self.context.fingerprints, DESCRIPTOR_VERSION])

    def descriptor(self) -> np.ndarray:
        """The dataset descriptor (stored beside the evaluations, so replay computes nothing)."""
        from memrl.data.descriptor import describe

        if self._descriptor is None:
            key = self.descriptor_key()
            found = self.evaluator.descriptor(key)
            if found is None:
                found = describe(self.context)
                self.evaluator.put_descriptor(key, {"name": self.name, **self.cfg.data.__dict__}, found)
            self._descriptor = found
        return self._descriptor.copy()


@dataclass(frozen=True)
class TaskEntry:
    """One entry of ``env.tasks``: its name, held-out flag and full config."""

    name: str
    heldout: bool
    cfg: Config


def full_unet(cfg: Config) -> Config:
    """``cfg`` fine-tuning every parameter of the UNet (mask of ones at block granularity): the
    MemControl paper's full fine-tuning, which memrl compares masks against."""
    return load_config(cfg, {"search.granularity": "block", "search.method": "full"})


def task_config(cfg: Config, task: dict[str, Any] | str) -> Config:
    """``cfg`` with ``data`` set to ``task``: an ``env.tasks`` entry or a data source."""
    overrides = {"source": task} if isinstance(task, str) else task
    return load_config(cfg, task_overrides(overrides))


def resolve_task(cfg: Config, task: int | str | dict[str, Any]) -> Config:
    """The config of one task: an index or name into ``env.tasks``, a data source, or data overrides."""
    from memrl.errors import ConfigError

    entries = suite(cfg)
    if isinstance(task, int):
        if not 0 <= task < len(entries):
            raise ConfigError(f"task {task} is outside 0..{len(entries) - 1} (the tasks of env.tasks)")
        return entries[task].cfg
    names = [e.name for e in entries]
    if isinstance(task, str) and task in names:
        return entries[names.index(task)].cfg
    return task_config(cfg, task)


def suite(cfg: Config) -> list[TaskEntry]:
    """The tasks of ``cfg.env.tasks`` (or ``cfg.data`` alone when it lists none)."""
    entries = cfg.env.tasks or [{}]
    return [
        TaskEntry(str(t.get("name", f"task{i}")), bool(t.get("heldout", False)), task_config(cfg, t))
        for i, t in enumerate(entries)
    ]


def make_evaluator(cfg: Config) -> Any:
    """The Evaluator of ``cfg.env``: its store, shipped table, backend and replay fallback."""
    from memrl.backends import Evaluator
    from memrl.store import EvaluationStore
    from memrl.tables import table_path

    e = cfg.env
    tables = [EvaluationStore(table_path(e.table), readonly=True)] if e.table else []
    fallback = "inprocess" if e.backend == "replay" and e.replay_fallback else None
    return Evaluator(EvaluationStore(e.store), e.backend, fallback=fallback, tables=tables, ray=cfg.ray)
