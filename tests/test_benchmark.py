"""The benchmark's baselines and statistics on a tiny synthetic table with known answers."""

import numpy as np
import pytest

from memrl.table import BenchTable, best_regret
from research.benchmark.experiments import sampler_seed
from research.benchmark.methods import prior_of, searched
from research.benchmark.stats import describe, paired_differences, summarise, task_bootstrap

COST = {  # cost of each mask (00, 01, 10, 11); reward = -cost whatever the preference
    "a": [0.0, 10.0, 20.0, 40.0],  # regret 0, .25, .5, 1 (rewards ten times wider than b's)
    "b": [4.0, 0.0, 1.0, 2.0],  # regret 1, 0, .25, .5
    "c": [2.0, 4.0, 0.0, 1.0],  # the test task: regret .5, 1, 0, .25
}


@pytest.fixture()
def table():
    cost = np.array(list(COST.values()))
    terms = np.stack([cost, cost, np.zeros_like(cost)], axis=-1)  # memorization = quality = cost
    noise = np.full((3, 1, 3, 3), np.nan)
    noise[2, 0] = [[c, c, 0.0] for c in (0.0, 0.4, 0.8)]  # mask 10 on c with three seeds
    return BenchTable(
        names=list(COST),
        heldout=np.array([False, False, True]),
        masks=np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.int8),
        terms=terms,
        descriptors=np.array([[0.0, 7.0], [10.0, 7.0], [9.0, 5.0]]),  # 2nd feature constant on a, b
        noise_masks=np.array([2]),
        noise_terms=noise,
    )


def test_every_zero_shot_baseline_picks_what_a_hand_computation_gives(table):
    train, test = [0, 1], 2
    for w in (0.25, 0.5, 0.75):
        assert np.allclose(table.regret(w)[test], [0.5, 1.0, 0.0, 0.25])
        # mean regret over a, b: .5, .125, .375, .75; mean raw reward: -2, -5, -10.5, -21
        assert searched("single-best", table, train, test, w, 4) == [1]
        assert searched("single-best-reward", table, train, test, w, 4) == [0]
        # standardised on a, b only: a = -1, b = 1, c = 0.8; the constant feature is dropped
        assert np.allclose(prior_of(table, train).distances(table.descriptors[test], [0, 1]), [1.8, 0.2])
        assert searched("nearest-task", table, train, test, w, 2) == [1, 2]  # b's two best
        # weights 1/1.8 and 1/0.2: weighted regrets .9, .025, .275, .55
        assert searched("knn-tasks", table, train, test, w, 4) == [1, 2, 3, 0]
        # greedy: 01 (mean .125), then 00 (with it the best-of-two regret is 0 on a and b)
        assert searched("portfolio", table, train, test, w, 2) == [1, 0]
    regret = table.regret(0.5)[test]
    assert best_regret(regret, [1]) == 1.0 and best_regret(regret, [1, 2]) == 0.0
    assert best_regret(regret, searched("portfolio", table, train, test, 0.5, 2)) == 0.5


def test_the_prior_mean_gp_exploits_the_calibrated_prior_then_completes_a_portfolio(table):
    # the training tasks' weights for c are .51 (a) and 1.45 (b) (distances 1.8 and 0.2 standardised,
    # spacing 2, width 0.6, floor 0.5): transfer regrets .74, .07, .32, .63. c's references 00 and 11
    # (rewards -2, -1) are ordered as c does by b only, so a's weight all but vanishes; they fit a map of
    # positive slope, so the best predicted mask is b's best, 01, although it is c's worst. Then the
    # portfolio steps: beside 01 (b's best), 00 (a's best) brings both training tasks to regret 0, so it
    # comes second (a reference counts as a pick only when chosen); with every source's best tried, the
    # tie goes to the lowest transfer regret: 10, c's best
    assert searched("gp-prior", table, [0, 1], 2, 0.5, 3) == [1, 0, 2]
    assert searched("gp-prior", table, [0, 1], 2, 0.5, 1) == [1]
    assert searched("gp-prior", table, [0, 1], 2, 0.5, 9) == [1, 0, 2, 3]  # budget beyond the table: stops


def test_an_untrained_search_policy_searches_as_the_prior_mean_gp(table):
    """The search network's logits are gp-prior's acquisition plus a learned correction that starts
    near zero, so before any training its picks are gp-prior's (and with nothing known, the mask of
    lowest transfer regret)."""
    import torch
    from gymnasium import spaces
    from memrl.agents.policy import Policy
    from memrl.agents.search_net import CandidatePolicy

    from memrl.config import load_config
    from memrl.episode import search_observation_size
    from research.benchmark.methods import search_policy_masks

    torch.manual_seed(0)
    n = search_observation_size(2)
    network = CandidatePolicy(
        spaces.Box(-10, 10, (n,), np.float32), spaces.Discrete(4), lambda _: 1e-3, net_arch=[8]
    )
    card = {"action_mode": "search", "search_space": {"groups": ["g0", "g1"]}}
    policy = Policy(
        card, network, load_config("test", {"env.mode": "search", "env.budget": 4}), prior_of(table, [0, 1])
    )
    for w in (0.25, 0.5, 0.75):
        assert search_policy_masks(policy, table, 2, w, 4) == searched("gp-prior", table, [0, 1], 2, w, 4)
        first = policy.candidates(table.descriptors[2], 1, table.preference(w))[0]
        transfer = prior_of(table, [0, 1]).transfer_regret(table.descriptors[2], table.preference(w))
        assert [int(v) for v in first] == list(table.masks[int(np.argmin(transfer))])


def test_from_scratch_samplers_draw_differently_on_each_task_and_alike_on_a_rerun():
    rng = np.random.default_rng(0)
    tasks, k = 8, 6
    cost = rng.random((tasks, 2**k))
    many = BenchTable(
        names=[f"task{i}" for i in range(tasks)],
        heldout=np.zeros(tasks, dtype=bool),
        masks=np.array([[(i >> (k - 1 - j)) & 1 for j in range(k)] for i in range(2**k)], dtype=np.int8),
        terms=np.stack([cost, cost, np.zeros_like(cost)], axis=-1),
        descriptors=rng.random((tasks, 3)),
    )
    for search in (
        lambda t, s: searched("random", many, [], t, 0.5, 3, s),
        lambda t, s: searched("tpe", many, [], t, 0.5, 3, s),
    ):
        firsts = [search(t, sampler_seed(0, many, t))[0] for t in range(tasks)]
        assert len(set(firsts)) > 1  # seeded with the run's seed alone, every task starts alike
        assert search(3, sampler_seed(0, many, 3)) == search(3, sampler_seed(0, many, 3))
    assert sampler_seed(0, many, 3) != sampler_seed(1, many, 3)


def test_gradient_top_g_picks_the_most_sensitive_groups_with_g_chosen_on_training_tasks(table):
    from memrl.descriptor import descriptor_fields, family_slices

    gradient = family_slices(2)["gradient"]
    descriptors = np.zeros((3, len(descriptor_fields(2))))
    descriptors[:, gradient.start : gradient.start + 2] = [[0.9, 0.1], [0.1, 0.8], [0.2, 0.7]]
    table.descriptors = descriptors
    # g = 0, 1, 2 give masks 00 / (a: 10, b: 01) / 11: mean regret .5, .25, .75 on a, b, so g = 1;
    # on c the most sensitive group is the second: mask 01 (index 1)
    assert searched("gradient-top-g", table, [0, 1], 2, 0.5, 1) == [1]


def test_noise_floor_is_the_mean_regret_difference_between_seeds(table):
    # mask 10 on c: regrets 0, .1, .2 over seeds (span 4); pairwise differences .1, .2, .1
    floor = table.noise_floor(0.5)
    assert floor[2] == pytest.approx(0.4 / 3)
    assert np.isnan(floor[:2]).all()


def test_source_folds_leave_out_every_task_of_the_test_tasks_source(table):
    from research.benchmark.folds import SPLITS, folds, source_folds, split_folds, split_of

    table.heldout = np.array([False, False, False])
    assert source_folds(table) == folds(table)  # every task its own source: leave one task out
    table.sources = ["digits", "digits", "faces"]
    assert folds(table) == [(0, [1, 2]), (1, [0, 2]), (2, [0, 1])]
    assert source_folds(table) == [(0, [2]), (1, [2]), (2, [0, 1])]
    assert split_folds(table)[3:] == [(0, [2], SPLITS[1]), (1, [2], SPLITS[1]), (2, [0, 1], SPLITS[1])]
    table.sources = ["digits", "digits", "digits"]
    assert source_folds(table) == []  # no other source to transfer from
    assert split_of({"heldout": "True"}) == SPLITS[2] and split_of({"heldout": False}) == SPLITS[0]
    assert split_of({"heldout": False, "split": SPLITS[1]}) == SPLITS[1]


def test_transfer_prior_weights_rise_with_closeness_and_keep_a_floor():
    from memrl.prior import KERNEL_FLOOR, KERNEL_WIDTH, TransferPrior

    terms = np.zeros((3, 2, 3))
    terms[:, :, 0] = [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]  # a prefers mask 0, b and c mask 1
    prior = TransferPrior(["a", "b", "c"], np.array([[0.0], [1.0], [2.0]]), terms)
    w = np.array([1.0, 0.0, 0.0])
    # standardised (std sqrt(2/3)) the sources sit 1 / std apart: spacing 1 / std, width 0.3 / std
    _, weights = prior.weighted_sources(np.array([0.0]), w)
    expected = np.exp(-0.5 * (np.array([0.0, 1.0, 2.0]) / KERNEL_WIDTH) ** 2) + KERNEL_FLOOR
    assert np.allclose(weights, expected)
    assert prior.transfer_regret(np.array([0.0]), w)[0] < 0.5  # a, on top of the new task, leads
    _, weights = prior.weighted_sources(np.array([0.0]), w, exclude=0)  # b, c: spacing 1 / std(1, 2)
    assert np.allclose(weights, np.exp(-0.5 * (np.array([1.0, 2.0]) / KERNEL_WIDTH) ** 2) + KERNEL_FLOOR)


def rows_of(values: dict[str, list[float]], method: str = "m", floor: float = 0.1) -> list[dict]:
    return [
        {
            "method": method,
            "task": task,
            "heldout": False,
            "memorization_weight": 0.5,
            "seed": seed,
            "fine_tunes": 1,
            "regret": v,
            "noise_floor": floor,
        }
        for task, vs in values.items()
        for seed, v in enumerate(vs)
    ]


def test_task_bootstrap_resamples_tasks_not_rows():
    groups = {"a": np.zeros(50), "b": np.ones(50)}
    # two tasks: a quarter of the draws hold only a (mean 0), a quarter only b (mean 1)
    assert task_bootstrap(groups, np.mean) == (0.0, 1.0)
    assert task_bootstrap({"a": np.full(5, 0.3)}, np.mean) == pytest.approx((0.3, 0.3))
    # and then rows within each drawn task: one task of rows 0 and 1 gives means 0, 0.5 and 1
    assert task_bootstrap({"a": np.array([0.0, 1.0])}, np.mean) == (0.0, 1.0)


def test_task_bootstrap_draws_what_task_by_task_resampling_draws():
    groups = {"a": np.array([0.1, 0.5, 0.2]), "b": np.array([0.9]), "c": np.arange(7) / 10}
    rng, values, draws = np.random.default_rng(0), list(groups.values()), []
    for _ in range(2000):  # the plain loop: tasks, then each drawn task's rows, one call each
        picked = rng.integers(len(values), size=len(values))
        draws.append(np.mean(np.concatenate([rng.choice(values[i], len(values[i])) for i in picked])))
    assert task_bootstrap(groups, np.mean) == (np.percentile(draws, 2.5), np.percentile(draws, 97.5))


def test_describe_reports_mean_tail_hits_and_paired_differences():
    rows = rows_of({"a": [0.0, 0.1, 0.5], "b": [0.3, 0.05, 0.2]})
    d = describe(rows)
    assert d["tasks"] == 2 and d["mean"] == pytest.approx(1.15 / 6) and d["worst"] == 0.5
    assert d["above_0.2"] == pytest.approx(2 / 6)  # 0.5 and 0.3
    assert d["hits"] == pytest.approx(3 / 6)  # 0.0, 0.1, 0.05 within the floor 0.1
    assert d["lo"] <= d["mean"] <= d["hi"]
    other = rows_of({"a": [0.1, 0.1, 0.1], "b": [0.1, 0.1, 0.1]}, method="ppo")
    diffs = paired_differences(rows + other, "m", "ppo")
    assert [r["regret"] for r in diffs] == pytest.approx([-0.1, 0.0, 0.4, 0.2, -0.05, 0.1])
    text = summarise(rows + other)
    assert "| m | 0.192 [" in text and "| ppo | 0.100 [0.100, 0.100] |" in text
    first = text.split("**The first pick (1 fine-tune), all preferences pooled**")[1].splitlines()
    assert first[2] == "| method | leave one task out: mean [95% CI] | IQM | worst | hits |"
    assert first[5] == "| ppo | 0.100 [0.100, 0.100] | 0.100 | 0.100 | 100% |"


def test_the_headline_table_pools_preferences_per_split_and_skips_unjudged_budgets():
    from research.benchmark.stats import headline

    rows = []
    for n, v in {1: 0.4, 2: 0.2, 3: 0.9, 4: 0.1}.items():  # 3 is not a headline budget
        rows += [{**r, "fine_tunes": n} for r in rows_of({"a": [v, v + 0.1], "b": [v]}, method="s")]
    rows += [{**r, "heldout": True} for r in rows_of({"c": [0.2, 0.3]}, method="s")]
    rows += [{**r, "memorization_weight": 0.25} for r in rows_of({"a": [0.4]}, method="one")]
    rows += rows_of({"a": [0.5]}, method="one")
    lines = headline(rows)
    assert lines[2] == "| method | leave one task out | held out |"  # no leave-one-source-out rows
    assert lines[4] == "| s | 0.433 / 0.233 / 0.133 | 0.250 |"
    assert lines[5] == "| one | 0.450 |  |"  # its 0.25 and 0.5 rows pooled; never held out


def test_the_transfer_plot_draws_each_split_and_every_method_judged_at_several_budgets(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.benchmark.stats import plot_budgets, plot_transfer

    rows = []
    for method in ("ppo-search", "ppo-search-no-history", "tpe"):
        for n in (1, 2, 4):
            values = {"a": [0.4 / n, 0.3 / n], "b": [0.2 / n]}
            rows += [{**r, "fine_tunes": n} for r in rows_of(values, method)]
    rows += rows_of({"a": [0.5], "b": [0.5]}, method="single-best")  # one budget: a bar, no curve
    rows += [{**r, "heldout": True} for r in rows_of({"c": [0.1]}, method="ppo-search")]
    plot_transfer(rows, tmp_path / "transfer.png")
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    plot_budgets(rows, ax, {"ppo-search": "black", "ppo-search-no-history": "red", "tpe": "blue"})
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["ppo-search"].get_xdata()) == [1, 2, 4]
    assert np.allclose(lines["tpe"].get_ydata(), [0.3, 0.15, 0.075])  # means over tasks' rows
    assert lines["ppo-search"].get_linewidth() > lines["tpe"].get_linewidth()
    assert lines["ppo-search-no-history"].get_linestyle() == "--" and len(ax.collections) == 1  # one band
    plt.close(fig)


def test_the_search_policy_is_compared_with_the_best_other_method_at_each_budget():
    from research.benchmark.stats import against_the_best

    rows = []
    budgets = {1: {"ppo-search": 0.3, "knn": 0.1, "tpe": 0.4}, 2: {"ppo-search": 0.05, "tpe": 0.2}}
    for n, values in budgets.items():
        for method, v in values.items():
            rows += [{**r, "fine_tunes": n} for r in rows_of({"a": [v, v], "b": [v, v]}, method=method)]
    ablation = rows_of({"a": [0.0], "b": [0.0]}, method="ppo-search-no-history")  # never a comparator
    lines = against_the_best(rows + ablation, [0.5], "leave one task out")
    assert lines[4] == "| 1 | knn | 0.100 | 0.300 | +0.200 [+0.200, +0.200] | +0.200 |"
    assert lines[5] == "| 2 | tpe | 0.200 | 0.050 | -0.150 [-0.150, -0.150] | -0.150 |"
    without = against_the_best(rows + ablation, [0.5], "leave one task out", exclude=("knn",))
    assert "`knn` left out" in without[0]
    assert without[4] == "| 1 | tpe | 0.400 | 0.300 | -0.100 [-0.100, -0.100] | -0.100 |"


def test_the_search_policy_per_task_sits_beside_the_best_other_method_at_one_fine_tune():
    from research.benchmark.stats import per_task

    rows = []
    budgets = {1: {"ppo-search": 0.3, "knn": 0.1, "tpe": 0.4, "gp-prior": 0.0}, 2: {"ppo-search": 0.05}}
    for n, values in budgets.items():
        for method, v in values.items():
            rows += [{**r, "fine_tunes": n} for r in rows_of({"a": [v, v + 0.2], "b": [v, v]}, method=method)]
    lines = per_task(rows, "held out")
    # gp-prior (the starting point) is never the comparator; knn has the lowest mean at 1
    assert lines[2] == "| task | 1 | 2 | knn at 1 |"
    assert lines[4] == "| a | 0.400 | 0.150 | 0.200 |" and lines[5] == "| b | 0.300 | 0.050 | 0.100 |"


def test_nested_tuning_chooses_each_folds_setting_without_its_own_results():
    from research.benchmark.experiments import leave_one_out, nested_rows, nested_settings

    def row(task: str, left_out: str, length: int, regret: float) -> dict:
        return {"task": task, "left_out": left_out, "learning_rate": 0.1, "length": length, "regret": regret}

    # Length 10 is best on a's own fold and on average (the flat choice), but the fits without a
    # and another task score better with 20 on that other task: a's nested setting is 20.
    rows = [
        row("a", "a", 10, 0.0), row("a", "a", 20, 0.9),
        row("b", "b", 10, 0.2), row("b", "b", 20, 0.3),
        row("c", "c", 10, 0.2), row("c", "c", 20, 0.1),
        row("b", "a+b", 10, 0.5), row("b", "a+b", 20, 0.1),
        row("a", "a+b", 10, 0.0), row("a", "a+b", 20, 0.0),
        row("c", "a+c", 10, 0.5), row("c", "a+c", 20, 0.1),
        row("a", "a+c", 10, 0.9), row("a", "a+c", 20, 0.0),
        row("c", "b+c", 10, 0.1), row("c", "b+c", 20, 0.6),
        row("b", "b+c", 10, 0.1), row("b", "b+c", 20, 0.6),
    ]  # fmt: skip
    # a: inner b (a+b) and c (a+c): 20 (0.1) beats 10 (0.5). b: a (a+b), c (b+c): 10 (0.05) vs 20 (0.3).
    # c: a (a+c), b (b+c): 10 (0.5) vs 20 (0.3).
    assert nested_settings(rows) == {"a": (0.1, 20), "b": (0.1, 10), "c": (0.1, 20)}
    assert {(r["task"], r["regret"]) for r in nested_rows(rows)} == {("a", 0.9), ("b", 0.2), ("c", 0.1)}
    assert len(leave_one_out(rows)) == 6
