"""A trained policy and its card: save, load safely, and propose masks for a new dataset.

``policy.zip`` is SB3's file; ``policy.card.json`` beside it records what the policy fits: the
search-space signature and group names, the descriptor schema, the action mode, the training
tasks, the config and its hash, and package versions. ``load_policy`` rebuilds the network from
the card and reads only the weights (``torch.load(weights_only=True)``): nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from memrl.agents.search_net import CandidatePolicy

from memrl.config import Config, load_config
from memrl.data import fit_sizes, usable_count
from memrl.descriptor import DESCRIPTOR_VERSION, descriptor_fields
from memrl.episode import (
    SearchHistory,
    all_masks,
    head,
    search_observation_size,
    sequential_finished,
    sequential_observation,
)
from memrl.errors import ConfigError, PolicyError
from memrl.prior import TransferPrior
from memrl.reward import PREFERENCE_FIELDS, preference_of, reward_version, with_preference
from memrl.searchers import Knowledge, SearchPolicySearcher, run
from memrl.task import Task, architecture_space, make_evaluator, task_config
from memrl.utils import atomic_write_text, package_versions

__all__ = [
    "CARD_SUFFIX",
    "MAX_CARD_BYTES",
    "MAX_MEMBER_BYTES",
    "PRIOR_SUFFIX",
    "Policy",
    "card_path",
    "default_policy",
    "load_policy",
    "make_card",
    "prior_path",
    "read_card",
    "read_weights",
    "shipped_controller",
    "shipped_policy",
    "write_card",
]

CARD_SUFFIX = ".card.json"
PRIOR_SUFFIX = ".prior.safetensors"
MAX_MEMBER_BYTES = 64 * 2**20
"""Largest zip member memrl reads (a policy's weights are a few hundred kB)."""
_CARD_FIELDS = (
    "search_space",
    "descriptor",
    "action_mode",
    "observation_dim",
    "net_arch",
    "config",
    "config_hash",
)


MAX_CARD_BYTES = 4_000_000
"""The largest policy card read (a card is tens of kilobytes)."""


def read_weights(path: Path, member: str, limit: int = MAX_MEMBER_BYTES) -> dict[str, Any]:
    """A state dict from zip ``member`` of ``path``, read safely: the declared size is checked
    before decompressing, and ``torch.load(weights_only=True)`` refuses anything but tensors."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
            if info.file_size > limit:
                raise PolicyError(
                    f"{path}: member {member} declares {info.file_size:,} bytes, more than a memrl "
                    f"policy holds ({limit:,}); the file is not a memrl policy or checkpoint"
                )
            data = zf.read(member)
    except KeyError:
        raise PolicyError(f"{path}: no {member} inside; not a memrl policy or checkpoint") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PolicyError(f"{path}: not a readable memrl policy ({exc}); retrain or re-copy it") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError(
            f"{path}: {member} is not plain tensors ({first[:120]}); memrl does not unpickle "
            "other objects: use a policy trained by memrl"
        ) from None
    if not isinstance(state, dict):
        raise PolicyError(f"{path}: {member} is not a state dict; use a policy trained by memrl")
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise PolicyError(f"{path}: {member} holds NaN or infinite weights ({bad[0]}); retrain the policy")
    return state


def read_card(card_file: Path) -> dict[str, Any]:
    """The policy card as a validated JSON object (at most :data:`MAX_CARD_BYTES`)."""
    try:
        if card_file.stat().st_size > MAX_CARD_BYTES:
            raise PolicyError(
                f"{card_file}: {card_file.stat().st_size:,} bytes, more than a policy card holds "
                f"({MAX_CARD_BYTES:,}); re-copy the card written with the policy"
            )
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{card_file}: not UTF-8 text; re-copy the card written with the policy") from None
    except json.JSONDecodeError as exc:
        raise PolicyError(
            f"{card_file}: not valid JSON ({exc}); re-copy the card written with the policy"
        ) from None
    if not isinstance(card, dict):
        raise PolicyError(f"{card_file}: a card is a JSON object, got {type(card).__name__}")
    missing = [f for f in _CARD_FIELDS if f not in card]
    if missing:
        raise PolicyError(f"{card_file}: the card lacks {', '.join(missing)}; re-copy or retrain the policy")
    space = card["search_space"]
    if not isinstance(space, dict) or not isinstance(space.get("groups"), list) or "signature" not in space:
        raise PolicyError(f"{card_file}: search_space must hold signature and groups")
    if card["action_mode"] not in ("mask", "sequential", "search", "control"):
        raise PolicyError(
            f"{card_file}: action_mode {card['action_mode']!r} is not mask, sequential, search or control"
        )
    dim = card["observation_dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= 100_000:
        raise PolicyError(
            f"{card_file}: observation_dim={dim!r} is not a size between 1 and 100,000; re-copy or "
            "retrain the policy"
        )
    arch = card["net_arch"]
    if not isinstance(arch, list) or not all(isinstance(n, int) and 0 < n <= 100_000 for n in arch):
        raise PolicyError(f"{card_file}: net_arch={arch!r} is not a list of layer widths; retrain the policy")
    return card


def shipped_policy() -> Path:
    """The search policy that ships with memrl (trained on the MemControl-Bench training tasks)."""

    return Path(str(resources.files("memrl") / "assets" / "policy" / "policy.zip"))


def shipped_controller() -> Path:
    """Where the controller that ships with memrl lies (trained by replay on the curve suite's
    training tasks; ``python -m research.release --config bench3 ...`` puts it there)."""
    return Path(str(resources.files("memrl") / "assets" / "controller" / "policy.zip"))


def default_policy() -> Path:
    """``apply_policy``'s policy without ``--policy``: the shipped controller once it is released,
    else the shipped search policy."""
    controller = shipped_controller()
    return controller if controller.is_file() else shipped_policy()


def card_path(policy_path: str | Path) -> Path:
    policy_path = Path(policy_path)
    return policy_path.with_name(policy_path.stem + CARD_SUFFIX)


def prior_path(policy_path: str | Path) -> Path:
    """Where a search policy's :class:`~memrl.prior.TransferPrior` lies beside its weights."""
    policy_path = Path(policy_path)
    return policy_path.with_name(policy_path.stem + PRIOR_SUFFIX)


def make_card(
    space: Any, cfg: Config, observation_dim: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card of a policy trained on ``cfg``'s tasks in search space ``space``."""
    return {
        "format": 1,
        "search_space": {
            "signature": space.signature,
            "granularity": space.granularity,
            "method": space.method,
            "groups": space.names,
        },
        "descriptor": {"version": DESCRIPTOR_VERSION, "fields": list(descriptor_fields(space.k))},
        "preference": {"fields": list(PREFERENCE_FIELDS), "sampling": cfg.env.preferences},
        "reward": {"version": reward_version(cfg.reward), "memorization": cfg.reward.memorization},
        "action_mode": cfg.env.mode,
        "stop_action": cfg.env.stop_action,
        "max_groups": cfg.env.max_groups,
        "observation_dim": int(observation_dim),
        "net_arch": list(cfg.ppo.net_arch),
        "training_tasks": [t for t in cfg.env.tasks if not t.get("heldout")] or [cfg.data.__dict__],
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "versions": package_versions(),
        **(extra or {}),
    }


def write_card(
    policy_path: Path, space: Any, cfg: Config, observation_dim: int, extra: dict[str, Any] | None = None
) -> Path:
    """Write the card beside ``policy_path`` (see :func:`make_card`)."""
    path = card_path(policy_path)
    atomic_write_text(path, json.dumps(make_card(space, cfg, observation_dim, extra), indent=2))
    return path


@dataclass
class Policy:
    """A loaded policy: its card, its network, the config it was trained with and, for a search
    policy, the training tasks' tables it scores masks with (its prior)."""

    card: dict[str, Any]
    network: Any
    config: Config
    prior: TransferPrior | None = None

    @classmethod
    def of_model(cls, model: Any, cfg: Config, prior: TransferPrior | None = None) -> Policy:
        """The policy of an SB3 model just trained on ``cfg`` (nothing is written)."""

        card = make_card(architecture_space(cfg), cfg, model.observation_space.shape[0])
        return cls(card=card, network=model.policy, config=cfg, prior=prior)

    @property
    def k(self) -> int:
        return len(self.card["search_space"]["groups"])

    def check_space(self, space) -> None:
        """Raise PolicyError naming the difference if ``space`` is not the one trained on."""
        sig = self.card["search_space"]
        if space.signature != sig["signature"]:
            details = []
            if space.names != sig["groups"]:
                details.append(f"groups {space.k} vs the policy's {len(sig['groups'])}")
            if space.method != sig["method"] or space.granularity != sig["granularity"]:
                details.append(
                    f"method/granularity {space.method}/{space.granularity} vs "
                    f"{sig['method']}/{sig['granularity']}"
                )
            raise PolicyError(
                "the policy was trained on another search space ("
                + ("; ".join(details) or "a different base-model architecture")
                + "); use the base model, search.granularity and search.method it was trained with"
            )

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        """The action probabilities at observation ``obs`` (per group, or per mask for a search policy)."""
        with torch.no_grad():
            dist = self.network.get_distribution(torch.as_tensor(obs[None], dtype=torch.float32))
            return dist.distribution.probs[0].numpy()

    def preference(self, preference: Any = None) -> np.ndarray:
        """``preference`` (3 weights) as a vector; None: the weights the policy was trained with."""
        reward = self.config.reward
        return preference_of(reward if preference is None else with_preference(reward, preference))

    def _ranked_masks(self, obs: np.ndarray, n: int) -> list[np.ndarray]:
        """The ``n`` most probable masks of a MultiBinary policy at ``obs``, best first."""
        p = np.clip(self.probabilities(obs), 1e-6, 1 - 1e-6)
        if self.k <= 16:
            masks = np.array(list(itertools.product((0, 1), repeat=self.k)), dtype=np.int8)
            logp = masks @ np.log(p) + (1 - masks) @ np.log(1 - p)
            return [masks[i] for i in np.argsort(-logp, kind="stable")[:n]]
        return [(p > 0.5).astype(np.int8)][:n]

    @property
    def budget(self) -> int:
        """Search policies: the masks per episode they were trained with."""
        return int(self.config.env.budget)

    def candidates(self, descriptor: np.ndarray, n: int = 1, preference: Any = None) -> list[np.ndarray]:
        """The ``n`` most probable masks for a dataset with this descriptor and a preference
        (memorization, quality, parameter weights; None: the training config's), best first. For a
        search policy: its first step, before any result (the zero-shot proposal)."""
        if self.card["action_mode"] == "control":
            raise PolicyError(
                "this policy is a controller (env.mode=control): it acts during a fine-tune and proposes "
                "no mask up front; use a mask or search policy here"
            )
        if self.card["action_mode"] == "search":
            observation = SearchHistory(self.k, self.budget).observation(
                self.preference(preference), self.prior_features(descriptor, preference)
            )
            order = np.argsort(-self.probabilities(observation), kind="stable")[:n]
            return [all_masks(self.k)[i] for i in order]
        first = head(descriptor, self.preference(preference))
        if self.card["action_mode"] == "mask":
            return self._ranked_masks(first, n)
        return [self._rollout(first)][:n]

    def prior_features(self, descriptor: np.ndarray, preference: Any) -> np.ndarray:
        """What a search policy's prior says about every mask for this dataset and preference."""
        if self.prior is None:
            raise PolicyError("this search policy has no prior (policy.prior.safetensors); retrain it")
        return self.prior.features(descriptor, self.preference(preference))

    def search(
        self,
        descriptor: np.ndarray,
        oracle: Any,
        budget: int,
        preference: Any = None,
        on_result: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run this search policy for ``budget`` fine-tunes on ``oracle`` (a
        :class:`memrl.searchers.TaskOracle` or :class:`~memrl.searchers.TableOracle`): each mask
        the most probable one not tried yet after every result so far. Returns the
        :class:`~memrl.searchers.History`."""

        knowledge = Knowledge(self.k, self.preference(preference), budget=budget, descriptor=descriptor)
        return run(SearchPolicySearcher(self, knowledge), oracle, budget, on_result=on_result)

    def _rollout(self, first: np.ndarray) -> np.ndarray:
        """Sequential policies: walk the groups, taking the most probable action each time."""
        mask = np.zeros(self.k, dtype=np.int8)
        budget = self.card.get("max_groups")
        for position in range(self.k):
            action = int(np.argmax(self.probabilities(sequential_observation(first, mask, position))))
            if action == 2:
                break
            mask[position] = action
            if sequential_finished(mask, position + 1, budget):
                break
        return mask

    def propose(
        self, source: Config | str | dict[str, Any], n: int = 1, preference: Any = None
    ) -> list[np.ndarray]:
        """Masks for a dataset: a Config, a data source (bundled name or path), or a dict of
        ``data`` overrides, for a preference (None: the training config's weights). Computes the
        dataset's descriptor; fine-tunes nothing. Splits are sized from the data, as
        ``apply_policy`` sizes them (16 images: 12 and 4 held out)."""

        base = self.config.with_changes(
            {"env.tasks": [], "env.store": None, "env.table": None, "env.backend": "inprocess"}
        )
        cfg = source if isinstance(source, Config) else task_config(base, source)
        if not isinstance(source, Config):
            sized = fit_sizes(cfg.data, usable_count(cfg.data))
            cfg = cfg.with_changes({"data": dataclasses.asdict(sized)})
        task = Task(cfg, make_evaluator(base))
        self.check_space(task.space)
        return self.candidates(task.descriptor(), n, preference)


def load_policy(path: str | Path) -> Policy:
    """Load ``policy.zip`` + its card (or a run directory holding them) without unpickling."""
    from gymnasium import spaces
    from stable_baselines3.common.policies import ActorCriticPolicy

    path = Path(path)
    if path.is_dir():
        path = path / "policy.zip"
    card_file = card_path(path)
    for needed in (path, card_file):
        if not needed.is_file():
            raise PolicyError(f"{needed}: no such file; train one with python -m memrl.train_agent")
    card = read_card(card_file)
    state = read_weights(path, "policy.pth")
    if card.get("descriptor", {}).get("version") != DESCRIPTOR_VERSION:
        raise PolicyError(
            f"{card_file}: descriptor version {card.get('descriptor', {}).get('version')} "
            f"differs from this memrl's {DESCRIPTOR_VERSION}; retrain the policy"
        )
    k = len(card["search_space"]["groups"])
    obs_space = spaces.Box(-10.0, 10.0, shape=(int(card["observation_dim"]),), dtype=np.float32)
    network_cls: Any = ActorCriticPolicy
    prior = None
    if card["action_mode"] == "search":
        if int(card["observation_dim"]) != search_observation_size(k):
            raise PolicyError(
                f"{card_file}: observation_dim {card['observation_dim']} is not this memrl's search "
                f"observation ({search_observation_size(k)} for {k} groups: the policy was trained with "
                "an older one); retrain it with python -m memrl.train_agent"
            )
        act_space: spaces.Space = spaces.Discrete(2**k)
        network_cls = CandidatePolicy
        names = card.get("prior", {}).get("tasks")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PolicyError(f"{card_file}: a search policy's card lists its prior's tasks; retrain it")

        prior = TransferPrior.load(prior_path(path), names, 2**k, len(descriptor_fields(k)))
    elif card["action_mode"] == "mask":
        act_space = spaces.MultiBinary(k)
    elif card["action_mode"] == "control":
        act_space = spaces.MultiBinary(k + 1)  # the groups of the next chunk, then stop
    else:
        act_space = spaces.Discrete(3 if card.get("stop_action") else 2)
    try:
        network = network_cls(obs_space, act_space, lambda _: 0.0, net_arch=list(card["net_arch"]))
        network.load_state_dict(state)
        config = load_config(card["config"])
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise PolicyError(f"{card_file}: its config is not valid for this memrl ({exc})") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(
            f"{path}: its weights do not fit its card ({first[:150]}); use the card written with "
            "these weights, or retrain the policy"
        ) from None
    network.eval()
    return Policy(card=card, network=network, config=config, prior=prior)
