"""The searcher protocol: every registered method on a table oracle, the run loop's budget and
repeat rules, and the clear errors for what a searcher lacks."""

import numpy as np
import pytest

from memrl.errors import ConfigError
from memrl.prior import TransferPrior
from memrl.searchers import (
    SEARCHERS,
    History,
    Knowledge,
    Result,
    TableOracle,
    Trial,
    make_searcher,
    names,
    run,
)
from memrl.searchers.basic import ListSearcher
from memrl.table import BenchTable, mask_index

K = 3


@pytest.fixture()
def table():
    rng = np.random.default_rng(0)
    cost = rng.random((4, 2**K))
    masks = np.array([[(i >> (K - 1 - j)) & 1 for j in range(K)] for i in range(2**K)], dtype=np.int8)
    return BenchTable(
        names=["a", "b", "c", "d"],
        heldout=np.array([False, False, False, True]),
        masks=masks,
        terms=np.stack([cost, cost[::-1], np.zeros_like(cost)], axis=-1),
        descriptors=rng.random((4, 40)),
    )


def knowledge_for(table, test=3, budget=5, policy=None):
    train = [0, 1, 2]
    prior = TransferPrior([table.names[t] for t in train], table.descriptors[train], table.terms[train])
    return Knowledge(
        k=K,
        preference=table.preference(0.5),
        seed=1,
        budget=budget,
        group_names=["down_blocks.0", "mid_block", "up_blocks.0"],
        descriptor=table.descriptors[test],
        prior=prior,
        policy=policy,
        available=TableOracle(table, test, 0.5).available(),
    )


@pytest.mark.parametrize("name", [n for n in names(live=False) if n not in ("policy", "exhaustive")])
def test_every_table_searcher_tries_distinct_masks_within_its_budget(table, name):
    oracle = TableOracle(table, 3, 0.5)
    history = run(make_searcher(name, knowledge_for(table)), oracle, 5)
    indices = [mask_index(m) for m in history.masks]
    assert 1 <= len(indices) <= 5 and len(set(indices)) == len(indices)
    assert [r.reward for r in history.results] == pytest.approx([oracle.rewards[i] for i in indices])
    again = run(make_searcher(name, knowledge_for(table)), TableOracle(table, 3, 0.5), 5)
    assert [mask_index(m) for m in again.masks] == indices  # seeded: the same picks on a rerun


def test_exhaustive_tries_every_mask_and_refuses_a_short_budget(table):
    history = run(make_searcher("exhaustive", knowledge_for(table, budget=8)), TableOracle(table, 3, 0.5), 8)
    assert [mask_index(m) for m in history.masks] == list(range(8))
    with pytest.raises(ConfigError, match="needs 8 evaluations"):
        make_searcher("exhaustive", knowledge_for(table, budget=4))


def test_a_repeated_trial_is_told_its_stored_result_and_costs_no_budget(table):
    calls = []

    class Counting(TableOracle):
        def evaluate(self, trial):
            calls.append(mask_index(trial.mask))
            return super().evaluate(trial)

    repeats = [Trial(np.array(m, dtype=np.int8)) for m in ([0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0])]
    told = []

    class Repeating:
        def __init__(self):
            self.items = iter(repeats)

        def ask(self, history):
            return next(self.items, None)

        def tell(self, trial, result):
            told.append((mask_index(trial.mask), result.reward))

    history = run(Repeating(), Counting(table, 0, 0.5), 3)
    assert calls == [1, 7, 2] and [mask_index(m) for m in history.masks] == [1, 7, 2]
    assert told[0] == told[1] and len(told) == 4  # the repeat was told the same result


def test_a_searcher_that_only_repeats_itself_stops_after_four_asks_per_fine_tune(table):
    class Stuck:
        asks = 0

        def ask(self, history):
            self.asks += 1
            return Trial(np.zeros(K, dtype=np.int8))

        def tell(self, trial, result):
            pass

    stuck = Stuck()
    history = run(stuck, TableOracle(table, 0, 0.5), 3)
    assert len(history) == 1 and stuck.asks == 12


def test_a_batch_is_asked_before_any_result_and_prefetched_at_once(table):
    prefetched = []

    class Batched(TableOracle):
        def prefetch(self, trials):
            prefetched.append([mask_index(t.mask) for t in trials])

    searcher = make_searcher("gp-prior", knowledge_for(table, budget=4))
    history = run(searcher, Batched(table, 3, 0.5), 4, batch=2)
    assert len(history) == 4 and len({mask_index(m) for m in history.masks}) == 4
    assert [len(b) for b in prefetched] == [2, 2]  # pending trials count as tried within a batch


def test_missing_knowledge_and_unknown_names_fail_with_the_fix(table):
    bare = Knowledge(k=K, preference=table.preference(0.5), budget=4)
    with pytest.raises(ConfigError, match="pass a search policy \\(--policy\\)"):
        make_searcher("portfolio", bare)
    with pytest.raises(ConfigError, match="needs a trained policy"):
        make_searcher("policy", bare)
    with pytest.raises(ConfigError, match="'sac' is not one of"):
        make_searcher("sac", bare)
    with pytest.raises(ConfigError, match="asks for PEFT method 'full'.*search it live"):
        run(make_searcher("fixed", bare), TableOracle(table, 0, 0.5), 4)
    assert make_searcher("optuna-tpe", bare).sampler == "tpe"  # the earlier names still work


def test_a_new_method_is_one_registry_line(table, monkeypatch):
    from memrl.searchers.registry import SearcherSpec

    def ones_first(knowledge):
        return ListSearcher(
            [Trial(np.ones(knowledge.k, dtype=np.int8)), Trial(np.zeros(knowledge.k, np.int8))]
        )

    monkeypatch.setitem(SEARCHERS, "ones-first", SearcherSpec(ones_first, (), "the mask of ones, then none"))
    history = run(make_searcher("ones-first", knowledge_for(table)), TableOracle(table, 3, 0.5), 5)
    assert [mask_index(m) for m in history.masks] == [7, 0]
    assert "ones-first" in names(live=False)


def test_history_baseline_and_best_ignore_failures():
    history = History(references=(float("nan"), -0.2))
    assert history.baseline == -0.2 and history.best_index() is None
    history.trials += [Trial(np.zeros(2, np.int8)), Trial(np.ones(2, np.int8))]
    history.results += [Result(float("-inf"), 1.0, 1.0, ok=False), Result(0.3, 0.1, 0.1)]
    assert history.best_index() == 1
