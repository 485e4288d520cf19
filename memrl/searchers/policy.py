"""A trained policy as a searcher: a search policy picks each mask after every result so far; a
mask or sequential policy proposes its most probable masks up front (zero-shot)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memrl.episode import SearchHistory
from memrl.errors import ConfigError
from memrl.prior import all_masks
from memrl.searchers.base import History, Knowledge, Result, Trial
from memrl.searchers.basic import ListSearcher

__all__ = ["SearchPolicySearcher", "policy_searcher"]


class SearchPolicySearcher:
    """A search policy (``env.mode=search``): each ask takes the most probable mask not tried yet
    given the observation of every result so far and the references (:class:`SearchHistory`).
    ``zero_history``: observe nothing but which masks were tried (an ablation)."""

    def __init__(self, policy: Any, knowledge: Knowledge, zero_history: bool = False) -> None:
        if policy.card["action_mode"] != "search":
            raise ConfigError("this policy was not trained to search (env.mode=search); retrain it")
        if knowledge.descriptor is None:
            raise ConfigError("a search policy needs the dataset's descriptor")
        self.policy, self.zero_history = policy, zero_history
        self.weights = policy.preference(knowledge.preference)
        self.prior = policy.prior_features(knowledge.descriptor, knowledge.preference)
        self.sources = (
            policy.prior.weighted_sources(knowledge.descriptor, self.weights)
            if policy.prior is not None
            else None
        )
        self.masks, self.budget = all_masks(policy.k), knowledge.budget
        self.state: SearchHistory | None = None

    def ask(self, history: History) -> Trial | None:
        if self.state is None:
            references = history.references
            if references is not None and not all(np.isfinite(references)):
                references = None
            self.state = SearchHistory(self.policy.k, self.budget, references, sources=self.sources)
        if len(self.state.masks) >= len(self.masks):
            return None
        probabilities = self.policy.probabilities(
            self.state.observation(self.weights, self.prior, self.zero_history)
        )
        return Trial(self.masks[int(np.argmax(probabilities))].copy())  # tried masks have probability 0

    def tell(self, trial: Trial, result: Result) -> None:
        assert self.state is not None, "tell before ask"
        self.state.add(trial.mask, result.reward, result.memorization, result.quality)


def policy_searcher(knowledge: Knowledge) -> Any:
    """``knowledge.policy`` as a searcher: a search policy searches; a mask or sequential policy
    lists its most probable masks (its zero-shot proposals)."""
    policy = knowledge.policy
    if policy is None:
        raise ConfigError("searcher 'policy' needs a trained policy: pass --policy RUN/policy.zip")
    if knowledge.descriptor is None:
        raise ConfigError("searcher 'policy' needs the dataset's descriptor")
    if policy.card["action_mode"] == "search":
        return SearchPolicySearcher(policy, knowledge)
    masks = policy.candidates(knowledge.descriptor, max(knowledge.budget, 1), knowledge.preference)
    return ListSearcher(Trial(np.asarray(m, dtype=np.int8)) for m in masks)
