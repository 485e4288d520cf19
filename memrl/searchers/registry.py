"""Every search method by name: the one list that ``python -m memrl.search``, ``apply_policy``,
``train_agent`` and the research benchmark read. A new method is a factory
``(Knowledge) -> Searcher`` and one line here; it then runs live and on tables alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memrl.errors import ConfigError
from memrl.searchers.base import Knowledge, Searcher
from memrl.searchers.basic import exhaustive, fixed_presets, hand_picked, index_mask, random_masks
from memrl.searchers.optuna_samplers import OptunaSearcher
from memrl.searchers.policy import policy_searcher
from memrl.searchers.transfer import (
    GPPriorSearcher,
    gradient_top_g,
    knn_tasks,
    nearest_task,
    nearest_task_masks,
    portfolio,
    regression,
    single_best,
    single_best_reward,
)

__all__ = ["ALIASES", "SEARCHERS", "SearcherSpec", "make_searcher", "names", "spec_of"]


@dataclass(frozen=True)
class SearcherSpec:
    """A registered method: how to build it, what it needs beyond results (``prior``: the
    training tasks' tables; ``policy``: a trained policy; ``live``: a PEFT method per trial, so
    not on tables), and one line saying what it does."""

    factory: Callable[[Knowledge], Searcher]
    needs: tuple[str, ...]
    summary: str


WARM_TRIALS = 4
"""``tpe-warm`` enqueues the nearest training task's best this many masks first."""


def _warm_tpe(knowledge: Knowledge) -> Searcher:
    warm = [index_mask(i, knowledge.k) for i in nearest_task_masks(knowledge, WARM_TRIALS)]
    return OptunaSearcher("tpe", knowledge, warm)


SEARCHERS: dict[str, SearcherSpec] = {
    "random": SearcherSpec(random_masks, (), "distinct uniformly random masks"),
    "exhaustive": SearcherSpec(exhaustive, (), "every mask in counting order (small K)"),
    "fixed": SearcherSpec(fixed_presets, ("live",), "no fine-tune, full, each PEFT method on all groups"),
    "presets": SearcherSpec(hand_picked, (), "attention of the down, mid and up blocks, then all"),
    "tpe": SearcherSpec(lambda kn: OptunaSearcher("tpe", kn), (), "Optuna TPE on the reward"),
    "gp": SearcherSpec(lambda kn: OptunaSearcher("gp", kn), (), "Optuna's Gaussian process on the reward"),
    "nsga2": SearcherSpec(lambda kn: OptunaSearcher("nsga2", kn), (), "Optuna NSGA-II on the two terms"),
    "single-best": SearcherSpec(single_best, ("prior",), "the mask best on average over training tasks"),
    "single-best-reward": SearcherSpec(
        single_best_reward, ("prior",), "the mask of best mean raw reward over training tasks"
    ),
    "portfolio": SearcherSpec(portfolio, ("prior",), "a greedy portfolio of masks over training tasks"),
    "nearest-task": SearcherSpec(nearest_task, ("prior",), "the best masks of the nearest training task"),
    "knn-tasks": SearcherSpec(knn_tasks, ("prior",), "the best masks of the 3 nearest training tasks"),
    "gradient-top-g": SearcherSpec(gradient_top_g, ("prior",), "the groups of largest base-model gradient"),
    "regression": SearcherSpec(regression, ("prior",), "boosted trees from (descriptor, mask) to reward"),
    "tpe-warm": SearcherSpec(
        _warm_tpe, ("prior",), "TPE started from the nearest training task's 4 best masks"
    ),
    "gp-prior": SearcherSpec(GPPriorSearcher, ("prior",), "a Gaussian process whose prior mean transfers"),
    "policy": SearcherSpec(policy_searcher, ("policy",), "a trained policy (a search policy searches)"),
}
ALIASES = {"optuna-tpe": "tpe", "optuna-gp": "gp", "optuna-nsga2": "nsga2"}
"""Earlier names, still accepted."""


def names(live: bool = True) -> list[str]:
    """Registered names (``live`` False: those that run on tables)."""
    return [n for n, spec in SEARCHERS.items() if live or "live" not in spec.needs]


def spec_of(name: str) -> SearcherSpec:
    """The registration of ``name`` (or an alias); a clear error naming the choices otherwise."""
    spec = SEARCHERS.get(ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(f"searcher {name!r} is not one of {list(SEARCHERS)}")
    return spec


def make_searcher(name: str, knowledge: Knowledge) -> Searcher:
    """The searcher registered as ``name`` (or an alias), built for ``knowledge``."""
    return spec_of(name).factory(knowledge)
