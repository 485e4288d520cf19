"""A trained policy and its card: save, load safely, and propose masks for a new dataset.

``policy.zip`` is SB3's file; ``policy.card.json`` beside it records what the policy fits: the
search-space signature and group names, the descriptor schema, the action mode, the training
tasks, the config and its hash, and package versions. ``load_policy`` rebuilds the network from
the card and reads only the weights (``torch.load(weights_only=True)``): nothing is unpickled.
"""

from __future__ import annotations

import io
import itertools
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memrl.config import Config, load_config
from memrl.data.descriptor import DESCRIPTOR_FIELDS, DESCRIPTOR_VERSION
from memrl.utils import atomic_write_text, package_versions

CARD_SUFFIX = ".card.json"


class PolicyError(ValueError):
    """A policy file or card is missing, corrupt, or does not fit this base model."""


def card_path(policy_path: str | Path) -> Path:
    policy_path = Path(policy_path)
    return policy_path.with_name(policy_path.stem + CARD_SUFFIX)


def write_card(policy_path: Path, env, cfg: Config, extra: dict[str, Any] | None = None) -> Path:
    """Write the policy card for a policy trained on ``env`` (a MemControlEnv)."""
    card = {
        "format": 1,
        "search_space": {
            "signature": env.space.signature,
            "granularity": env.space.granularity,
            "method": env.space.method,
            "groups": env.space.names,
        },
        "descriptor": {"version": DESCRIPTOR_VERSION, "fields": list(DESCRIPTOR_FIELDS)},
        "action_mode": cfg.env.mode,
        "stop_action": cfg.env.stop_action,
        "max_groups": cfg.env.max_groups,
        "observation_dim": int(env.observation_space.shape[0]),
        "net_arch": list(cfg.ppo.net_arch),
        "training_tasks": env.tasks,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "versions": package_versions(),
        **(extra or {}),
    }
    path = card_path(policy_path)
    atomic_write_text(path, json.dumps(card, indent=2))
    return path


@dataclass
class Policy:
    """A loaded policy: its card, its network, and the config it was trained with."""

    card: dict[str, Any]
    network: Any
    config: Config

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

    def _probabilities(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            dist = self.network.get_distribution(torch.as_tensor(obs[None], dtype=torch.float32))
            return dist.distribution.probs[0].numpy()

    def candidates(self, descriptor: np.ndarray, n: int = 1) -> list[np.ndarray]:
        """The ``n`` most probable masks for a dataset with this descriptor, best first."""
        if self.card["action_mode"] == "mask":
            p = np.clip(self._probabilities(descriptor), 1e-6, 1 - 1e-6)
            if self.k <= 16:
                masks = np.array(list(itertools.product((0, 1), repeat=self.k)), dtype=np.int8)
                logp = masks @ np.log(p) + (1 - masks) @ np.log(1 - p)
                return [masks[i] for i in np.argsort(-logp)[:n]]
            best = (p > 0.5).astype(np.int8)
            return [best][:n]
        return [self._rollout(descriptor)][:n]

    def _rollout(self, descriptor: np.ndarray) -> np.ndarray:
        """Sequential policies: walk the groups, taking the most probable action each time."""
        mask = np.zeros(self.k, dtype=np.int8)
        budget = self.card.get("max_groups")
        for position in range(self.k):
            onehot = np.zeros(self.k, dtype=np.float32)
            onehot[position] = 1
            obs = np.concatenate([descriptor, mask.astype(np.float32), onehot])
            action = int(np.argmax(self._probabilities(obs)))
            if action == 2:
                break
            mask[position] = action
            if budget is not None and mask.sum() >= budget:
                break
        return mask

    def propose(self, source: Config | str | dict[str, Any], n: int = 1) -> list[np.ndarray]:
        """Masks for a dataset: a Config, a data source path, or a dict of ``data`` overrides."""
        from memrl.envs.memcontrol import MemControlEnv

        cfg = source if isinstance(source, Config) else self.config
        env = MemControlEnv(cfg, overrides={"env.tasks": [], "env.store": None})
        self.check_space(env.space)
        if not isinstance(source, Config):
            env.reset(options={"dataset": source})
        else:
            env.reset(options={"dataset": 0})
        return self.candidates(env.dataset_descriptor, n)


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
    try:
        card = json.loads(card_file.read_text())
        with zipfile.ZipFile(path) as zf:
            state = torch.load(io.BytesIO(zf.read("policy.pth")), map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, zipfile.BadZipFile, KeyError, RuntimeError, OSError) as exc:
        raise PolicyError(f"{path}: not a readable memrl policy ({exc}); retrain or re-copy it") from None
    if card.get("descriptor", {}).get("version") != DESCRIPTOR_VERSION:
        raise PolicyError(
            f"{card_file}: descriptor version {card.get('descriptor', {}).get('version')} "
            f"differs from this memrl's {DESCRIPTOR_VERSION}; retrain the policy"
        )
    k = len(card["search_space"]["groups"])
    obs_space = spaces.Box(-10.0, 10.0, shape=(card["observation_dim"],), dtype=np.float32)
    if card["action_mode"] == "mask":
        act_space: spaces.Space = spaces.MultiBinary(k)
    else:
        act_space = spaces.Discrete(3 if card.get("stop_action") else 2)
    network = ActorCriticPolicy(obs_space, act_space, lambda _: 0.0, net_arch=card["net_arch"])
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise PolicyError(f"{path}: weights do not match its card ({exc})") from None
    network.eval()
    return Policy(card=card, network=network, config=load_config(card["config"]))
