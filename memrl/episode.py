"""What a policy observes in each episode mode, defined once for the env and for :class:`Policy`.

* ``mask``: one step; the observation is the dataset descriptor and the preference (the *head*).
* ``sequential``: one step per group; the head, the partial mask and a one-hot of the group.
* ``search``: a budget of ``B`` fine-tunes on one task and preference; each step's action is a
  whole mask, evaluated, and the next observation summarises what the search has seen so far
  (:class:`SearchHistory`): what a user running the search would know, nothing from a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEARCH_SCALARS = ("budget_left", "tried_share", "best_reward", "last_reward", "best_mem", "best_quality")
"""The scalars at the end of a search observation (rewards relative to the better reference)."""


def head(descriptor: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """The part every observation starts with: the dataset descriptor, then the preference."""
    return np.concatenate([descriptor, preference]).astype(np.float32)


def sequential_observation(head_part: np.ndarray, mask: np.ndarray, position: int) -> np.ndarray:
    """Sequential mode: the head, the partial mask and a one-hot of the group decided next."""
    k = len(mask)
    onehot = np.zeros(k, dtype=np.float32)
    if position < k:
        onehot[position] = 1
    return np.concatenate([head_part, mask.astype(np.float32), onehot])


def sequential_finished(mask: np.ndarray, position: int, max_groups: int | None) -> bool:
    """Whether a sequential episode is over: every group decided, or ``max_groups`` unfrozen."""
    return position >= len(mask) or (max_groups is not None and int(mask.sum()) >= max_groups)


def search_observation_size(head_size: int, k: int) -> int:
    """Length of a search-mode observation for a head of ``head_size`` and ``k`` groups."""
    return head_size + 4 * k + len(SEARCH_SCALARS)


@dataclass
class SearchHistory:
    """The results a search has seen on one task, and their fixed-size summary.

    Rewards are the task's normalised rewards for the episode's preference, relative to
    ``baseline`` (the better of the two references, no fine-tune and the mask of ones), so 0 means
    "no better than a reference" and positive values are improvements.

    Args:
        k: groups of the search space; budget: the masks the search may evaluate.
        baseline: the better reference's reward (the env's reward is the improvement over it).
    """

    k: int
    budget: int
    baseline: float = 0.0
    masks: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terms: list[tuple[float, float]] = field(default_factory=list)

    def add(self, mask: np.ndarray, reward: float, memorization: float, quality: float) -> float:
        """Record one result; returns the improvement of the best-so-far reward (the env's reward:
        a repeated mask, or one no better than the best so far, brings 0)."""
        before = self.best_reward
        repeat = any(np.array_equal(mask, m) for m in self.masks)
        self.masks.append(np.asarray(mask, dtype=np.int8).copy())
        self.rewards.append(float(reward) if np.isfinite(reward) else -np.inf)
        self.terms.append((float(memorization), float(quality)))
        return 0.0 if repeat else max(self.best_reward - before, 0.0)

    @property
    def best_reward(self) -> float:
        """The best reward so far, and never below ``baseline``."""
        return max([self.baseline, *self.rewards])

    @property
    def done(self) -> bool:
        return len(self.masks) >= self.budget

    def best_index(self) -> int | None:
        if not self.rewards or max(self.rewards) == -np.inf:
            return None
        return int(np.argmax(self.rewards))

    def observation(self, head_part: np.ndarray, zero_history: bool = False) -> np.ndarray:
        """The head, then per group: share of tried masks with it on, mean reward with it on minus
        with it off, its bit in the best mask, its bit in the last mask; then :data:`SEARCH_SCALARS`.
        ``zero_history`` blanks everything after the head except the budget left (an ablation)."""
        k = self.k
        on_share = np.zeros(k)
        effect = np.zeros(k)
        best_mask = np.zeros(k)
        last_mask = np.zeros(k)
        best_rel, last_rel, best_terms = 0.0, 0.0, (0.0, 0.0)
        finite = [(m, r) for m, r in zip(self.masks, self.rewards) if np.isfinite(r)]
        if self.masks:
            tried = np.array(self.masks, dtype=float)
            on_share = tried.mean(axis=0)
            last_mask = tried[-1]
            last = self.rewards[-1]
            last_rel = float(np.clip(last - self.baseline, -2, 2)) if np.isfinite(last) else -2.0
        if finite:
            masks = np.array([m for m, _ in finite], dtype=float)
            rewards = np.array([r for _, r in finite])
            for g in range(k):
                on, off = rewards[masks[:, g] == 1], rewards[masks[:, g] == 0]
                if len(on) and len(off):
                    effect[g] = np.clip(on.mean() - off.mean(), -2, 2)
            best = self.best_index()
            if best is not None:
                best_mask = self.masks[best].astype(float)
                best_rel = float(np.clip(self.rewards[best] - self.baseline, -2, 2))
                best_terms = tuple(float(np.clip(v, -2, 2)) for v in self.terms[best])  # type: ignore[assignment]
        scalars = [
            (self.budget - len(self.masks)) / max(self.budget, 1),
            len(self.masks) / max(self.budget, 1),
            best_rel,
            last_rel,
            *best_terms,
        ]
        history = np.concatenate([on_share, effect, best_mask, last_mask, scalars]).astype(np.float32)
        if zero_history:
            history = np.zeros_like(history)
            history[4 * k] = scalars[0]
        return np.concatenate([head_part, history]).astype(np.float32)
