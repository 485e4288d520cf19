"""The search policy's parts on hand-made numbers: the prior, the posterior, the observation, and a
network that never proposes a mask twice."""

from __future__ import annotations

import numpy as np
import pytest

from memrl.episode import CANDIDATE_FEATURES, SEARCH_GLOBALS, TRIED, SearchHistory
from memrl.gp import NOISE, posterior
from memrl.prior import KERNEL_FLOOR, KERNEL_WIDTH, TransferPrior, all_masks

K = 2
COLUMNS = {name: i for i, name in enumerate(CANDIDATE_FEATURES)}


def rows_of(obs: np.ndarray) -> np.ndarray:
    return obs[len(SEARCH_GLOBALS) :].reshape(2**K, len(CANDIDATE_FEATURES))


def toy_prior() -> TransferPrior:
    """Three source tasks on a 1-d descriptor (0, 1, 10); memorization term only, so at weights
    (1, 0, 0) a mask's regret is its term rescaled per task."""
    terms = np.zeros((3, 4, 3))
    terms[0, :, 0] = [0.0, 1.0, 2.0, 4.0]  # regret 0, .25, .5, 1
    terms[1, :, 0] = [4.0, 0.0, 2.0, 4.0]  # regret 1, 0, .5, 1
    terms[2, :, 0] = [0.0, 0.0, 0.0, 8.0]  # regret 0, 0, 0, 1
    return TransferPrior(["a", "b", "c"], np.array([[0.0], [1.0], [10.0]]), terms)


def test_the_prior_weights_sources_by_standardised_distance_and_leaves_one_out():
    prior = toy_prior()
    w = np.array([1.0, 0.0, 0.0])
    z = (np.array([0.0, 1.0, 10.0]) - 11 / 3) / np.std([0.0, 1.0, 10.0])
    assert np.allclose(
        prior.distances(np.array([0.2]), [0, 1, 2]), np.abs(z - (0.2 - 11 / 3) / np.std([0, 1, 10]))
    )
    feats = prior.features(np.array([0.2]), w)
    # the sources' spacing is the a-b gap (1 raw unit; the median of 1, 1, 9); raw distances from
    # 0.2 are 0.2, 0.8, 9.8, so in units of the kernel's width they are d / 0.3
    assert prior.spacing([0, 1, 2]) == pytest.approx(1 / np.std([0, 1, 10]))
    weights = np.exp(-0.5 * (np.array([0.2, 0.8, 9.8]) / KERNEL_WIDTH) ** 2) + KERNEL_FLOOR
    regret = np.array([[0, 0.25, 0.5, 1], [1, 0, 0.5, 1], [0, 0, 0, 1]])
    transfer = weights @ regret / weights.sum()
    assert np.allclose(prior.weighted_sources(np.array([0.2]), w)[1], weights)
    assert np.allclose(feats[:, 0], transfer)
    assert np.allclose(feats[:, 1], np.argsort(np.argsort(transfer)) / 3)
    # far from every source, each keeps only the floor: the plain average
    assert np.allclose(prior.transfer_regret(np.array([100.0]), w), regret.mean(axis=0))
    assert np.allclose(feats[:, 2], regret[0]) and np.allclose(feats[:, 3], regret.mean(axis=0))
    # leaving source "a" out: the nearest is "b", standardised on b and c only
    assert np.allclose(prior.features(np.array([0.2]), w, exclude=0)[:, 2], regret[1])
    assert (
        TransferPrior(["a"], prior.descriptors[:1], prior.terms[:1]).features([0.0], w, exclude=0) == 0.5
    ).all()


def test_agreement_discounts_a_neighbour_that_orders_the_results_the_other_way():
    from memrl.prior import AGREEMENT_SHARPNESS, agreement_regret

    regret = np.array([[0, 0.25, 0.5, 1], [1, 0, 0.5, 1], [0, 0, 0, 1]])
    weights = np.array([1.0, 2.0, 1.0])
    # no result yet: the weighted average (transfer_regret)
    assert np.allclose(agreement_regret(regret, weights, [], np.zeros(0)), weights @ regret / 4)
    # results on masks 0, 1, 3 with rewards 3 > 2 > 1: source a orders all 3 pairs as the task
    # does; b orders (0, 1) the other way, ties (0, 3) and agrees on (1, 3) (1 of 3 discordant);
    # c ties (0, 1), which is not discordant, and agrees on the rest (0 of 3)
    got = agreement_regret(regret, weights, [0, 1, 3], np.array([3.0, 2.0, 1.0]))
    w = weights * np.exp(-AGREEMENT_SHARPNESS * np.array([0.0, 1 / 3, 0.0]))
    assert np.allclose(got, w @ regret / w.sum())
    assert got[0] < weights @ regret[:, 0] / 4  # b, which says mask 0 is worst, counts for less


def test_a_portfolio_step_scores_how_well_a_mask_completes_the_tried_ones():
    from memrl.prior import AGREEMENT_SHARPNESS, portfolio_regret

    regret = np.array([[0, 0.25, 0.5, 1], [1, 0, 0.5, 1], [0, 0.5, 0, 1]])
    weights = np.array([1.0, 1.0, 2.0])
    # mask 1 tried: the sources' bests are .25, 0, .5; adding mask 0 brings them to 0, 0, 0, mask 2
    # to .25, 0, 0 (weighted mean .0625), mask 3 or mask 1 again nothing (1.25 / 4)
    assert np.allclose(portfolio_regret(regret, weights, [1], [], np.zeros(0)), [0, 0.3125, 0.0625, 0.3125])
    # nothing tried: each mask alone, the weighted transfer regret
    assert np.allclose(portfolio_regret(regret, weights, [], [], np.zeros(0)), weights @ regret / 4)
    # results say mask 1 beats mask 0: sources a and c order them the other way and all but vanish,
    # so b, whose best (mask 1) is tried, decides: no mask improves on it
    got = portfolio_regret(regret, weights, [1], [0, 1], np.array([0.0, 1.0]))
    w = weights * np.exp(-AGREEMENT_SHARPNESS * np.array([1.0, 0.0, 1.0]))
    assert np.allclose(got, [0, (0.25 * w[0] + 0.5 * w[2]), 0.25 * w[0], 0.25 * w[0] + 0.5 * w[2]] / w.sum())

    prior = TransferPrior(["a", "b", "c"], np.zeros((3, 1)), np.zeros((3, 4, 3)))
    history = SearchHistory(K, budget=4, references=(0.0, 0.5), sources=(regret, weights))
    step = SEARCH_GLOBALS.index("portfolio_step")
    column = COLUMNS["portfolio_score"]
    features = prior.features(np.zeros(1), np.array([1.0, 0.0, 0.0]))
    first = history.observation(np.array([1.0, 0.0, 0.0]), features)
    assert first[step] == 0 and (rows_of(first)[:, column] == 0).all()  # the first pick is not one
    history.add(np.array([0, 1]), 0.8, 0.1, 0.2)
    obs = history.observation(np.array([1.0, 0.0, 0.0]), features)
    # results: the references (masks 0 and 3: rewards 0 and .5) and mask 1 (.8), which sources a and
    # c order the other way on 2 of 3 pairs; the score is the portfolio regret below its best, 0 there
    expected = portfolio_regret(regret, weights, [1], [0, 3, 1], np.array([0.0, 0.5, 0.8]))
    scores = rows_of(obs)[:, column]
    assert obs[step] == 1 and scores[int(np.argmin(expected))] == 0 and (scores <= 0).all()
    assert np.allclose(scores, (expected.min() - expected) / expected.std(), atol=1e-6)
    assert (
        rows_of(history.observation(np.array([1.0, 0.0, 0.0]), features, zero_history=True))[:, column].max()
        == 0
    )
    history.add(np.array([1, 0]), 0.6, 0.1, 0.2)
    history.add(np.array([0, 0]), 0.0, 0.1, 0.2)
    assert history.observation(np.array([1.0, 0.0, 0.0]), features)[step] == 0  # past PORTFOLIO_STEPS (2)


def test_the_first_pick_follows_the_training_tasks_that_order_the_references_as_this_task_does():
    # a (weight 10) says no fine-tune (mask 0) beats the mask of ones (3), b (weight 1) the reverse;
    # the task's references agree with b, so the calibrated mean before any fine-tune is b's map
    regret = np.array([[0, 0.1, 1, 0.5], [0.5, 1, 0, 0.2]])
    weights = np.array([10.0, 1.0])
    transfer = weights @ regret / weights.sum()  # a's view: masks 0 and 2 best
    prior = np.column_stack([transfer, np.zeros((4, 3))])
    history = SearchHistory(K, budget=4, references=(0.0, 1.0), sources=(regret, weights))
    calibrated = rows_of(history.observation(np.array([1.0, 0.0, 0.0]), prior))[:, COLUMNS["calibrated_mean"]]
    assert (
        calibrated[2] > 1 and calibrated[1] < -3
    )  # b's best above the better reference, its worst far below
    history.sources = None  # without the sources: a's weighted view, and nothing above the references
    calibrated = rows_of(history.observation(np.array([1.0, 0.0, 0.0]), prior))[:, COLUMNS["calibrated_mean"]]
    assert calibrated.max() <= 0


def test_the_posterior_matches_a_hand_computed_gaussian_process():
    x = np.array([[0, 0]])
    mean, std = posterior(x, np.array([2.0]), all_masks(K))
    similarity = np.exp(-np.array([0, 1, 1, 2]) / (0.25 * K))
    assert np.allclose(mean, similarity * 2.0 / (1 + NOISE))
    assert np.allclose(std, np.sqrt(1 - similarity**2 / (1 + NOISE)))


def test_the_calibrated_posterior_maps_the_prior_to_rewards_and_never_inverts_it():
    from memrl.gp import best_candidate, calibrated_posterior

    prior = np.array([0.0, 1.0, 0.5, 0.25])  # knn regret of masks 00, 01, 10, 11
    mean, std, scale = calibrated_posterior(prior, [0, 1], np.array([1.0, 0.0]), all_masks(K))
    # reward = 1 - regret fits both exactly: no residual, so the mean is the map itself
    assert np.allclose(mean, [1.0, 0.0, 0.5, 0.75]) and scale == 0.5
    assert std[0] < std[2] and std[3] > std[2] * 0.99  # seen masks are the surest
    # rewards that rise with the prior's regret: the slope is clipped to 0, the mean is flat plus the GP
    mean, _, _ = calibrated_posterior(prior, [0, 1], np.array([0.0, 1.0]), all_masks(K))
    gp, _, _ = calibrated_posterior(np.zeros(4), [0, 1], np.array([0.0, 1.0]), all_masks(K))
    assert np.allclose(mean, gp)
    # results that say nothing (equal rewards): every mean is equal, and the prior breaks the tie
    mean, _, _ = calibrated_posterior(prior, [0, 1], np.array([0.5, 0.5]), all_masks(K))
    assert np.allclose(mean, 0.5, rtol=0, atol=1e-12) and best_candidate(mean, prior) == 0
    assert best_candidate(mean, np.array([0.3, 0.2, 0.1, 0.1])) == 2


def test_a_search_observation_shows_results_references_and_tries():
    prior = np.tile([[0.1, 0.2, 0.3, 0.4]], (4, 1))
    history = SearchHistory(K, budget=3, references=(0.0, 0.5))
    first = history.observation(np.array([0.5, 0.5, 0.0]), prior)
    assert first[:3].tolist() == [0.5, 0.5, 0.0] and first[3] == 1.0 and first[6] == 0.0
    rows = rows_of(first)
    assert np.allclose(rows[:, :4], prior) and rows[:, TRIED].sum() == 0
    assert rows[0, COLUMNS["posterior_std"]] < 0.3 and rows[1, COLUMNS["posterior_std"]] > 0.5  # refs seen
    assert history.add(np.array([0, 1]), 0.8, 0.1, 0.2) == pytest.approx(0.3)  # 0.8 - better reference
    assert history.add(np.array([1, 0]), 0.6, 0.1, 0.2) == 0.0
    obs = history.observation(np.array([0.5, 0.5, 0.0]), prior)
    rows = rows_of(obs)
    assert rows[:, TRIED].tolist() == [0, 1, 1, 0]
    assert rows[:, COLUMNS["distance_to_best"]].tolist() == [0.5, 0.0, 1.0, 0.5]
    assert rows[1, COLUMNS["posterior_mean"]] == pytest.approx(max(rows[:, COLUMNS["posterior_mean"]]))
    assert obs[4] == pytest.approx(2 / 3) and obs[5] == pytest.approx(0.3, abs=1e-6) and obs[6] == 1.0
    calibrated = rows[:, COLUMNS["calibrated_mean"]]
    # the best so far, observed: about its own value (the posterior's noise shrinks it a little)
    assert calibrated[1] == pytest.approx(0.0, abs=0.1) and calibrated[1] == calibrated.max()
    assert (rows[:, COLUMNS["calibrated_improvement"]] >= 0).all()
    blank = rows_of(history.observation(np.array([0.5, 0.5, 0.0]), prior, zero_history=True))
    assert blank[:, TRIED].tolist() == [0, 1, 1, 0] and (blank[:, COLUMNS["posterior_std"]] == 1).all()
    assert np.allclose(blank[:, COLUMNS["calibrated_mean"]], -prior[:, 0])  # nothing known: the prior


def test_the_candidate_network_never_proposes_a_tried_mask():
    import torch
    from gymnasium import spaces
    from memrl.agents.policy import Policy
    from memrl.agents.search_net import CandidatePolicy

    from memrl.config import load_config
    from memrl.episode import search_observation_size

    torch.manual_seed(0)
    n = search_observation_size(K)
    network = CandidatePolicy(
        spaces.Box(-10, 10, (n,), np.float32), spaces.Discrete(2**K), lambda _: 1e-3, net_arch=[8]
    )
    with torch.no_grad():  # a scorer that strongly prefers the mask of ones
        network.mlp_extractor.logit.weight.zero_()
        network.mlp_extractor.logit.bias.zero_()
    obs = SearchHistory(K, 4).observation(np.array([0.5, 0.5, 0.0]), np.zeros((4, 4)))
    obs[len(SEARCH_GLOBALS) + 3 * len(CANDIDATE_FEATURES) + TRIED] = 1  # mask 11 tried
    dist = network.get_distribution(torch.as_tensor(obs[None]))
    assert dist.distribution.probs[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    cfg = load_config("test", {"env.mode": "search", "env.budget": 4})
    card = {"action_mode": "search", "search_space": {"groups": ["g0", "g1"]}}
    prior = TransferPrior(["a"], np.zeros((1, 1)), np.zeros((1, 4, 3)))
    history = Policy(card, network, cfg, prior).search(np.zeros(1), SumOracle(), 4)
    assert sorted(map(tuple, history.masks)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_the_learned_correction_waits_for_the_first_result():
    import torch
    from gymnasium import spaces
    from memrl.agents.search_net import CandidatePolicy

    from memrl.episode import search_observation_size

    torch.manual_seed(0)
    network = CandidatePolicy(
        spaces.Box(-10, 10, (search_observation_size(K),), np.float32),
        spaces.Discrete(2**K),
        lambda _: 1e-3,
        net_arch=[8],
    )
    scorer = network.mlp_extractor
    prior = np.array([[0.0, 0.0, 0.0, 0.0], [0.2] * 4, [0.6] * 4, [1.0] * 4])
    first = SearchHistory(K, 4).observation(np.array([0.5, 0.5, 0.0]), prior)
    later = SearchHistory(K, 4, references=(0.0, 0.5))
    later.add(np.array([0, 1]), 0.4, 0.2, 0.1)
    second = later.observation(np.array([0.5, 0.5, 0.0]), prior)
    obs = torch.as_tensor(np.stack([first, second]))
    untrained = scorer.forward_actor(obs).detach()
    with torch.no_grad():  # a trained scorer: a large correction pointing at the prior's worst mask
        scorer.logit.weight.normal_(0, 10.0)
        scorer.logit.bias.fill_(3.0)
    trained = scorer.forward_actor(obs).detach()
    assert torch.allclose(trained[0], untrained[0])  # the first pick is always the prior's
    assert int(trained[0].argmax()) == 0
    assert not torch.allclose(trained[1], untrained[1])  # after a result, the correction acts


@pytest.mark.parametrize(
    "bad,message",
    [
        ("nan", "hold infinite, NaN or huge values"),
        ("huge", "hold infinite, NaN or huge values"),
        ("width", "descriptors of 2 entries"),
    ],
)
def test_a_prior_with_bad_values_or_shape_is_refused(tmp_path, bad, message):
    from memrl.errors import PolicyError

    prior = toy_prior()
    descriptors, terms = prior.descriptors.copy(), prior.terms.copy()
    if bad == "nan":
        descriptors[0, 0] = np.nan
    elif bad == "huge":
        terms[0, 0, 0] = 1e308
    TransferPrior(prior.names, descriptors, terms).save(tmp_path / "p.safetensors")
    width = 2 if bad == "width" else 1
    with pytest.raises(PolicyError, match=message):
        TransferPrior.load(tmp_path / "p.safetensors", prior.names, prior.terms.shape[1], width)
    TransferPrior(prior.names, prior.descriptors, prior.terms).save(tmp_path / "ok.safetensors")
    assert (
        TransferPrior.load(tmp_path / "ok.safetensors", prior.names, prior.terms.shape[1], 1).names
        == prior.names
    )


class SumOracle:
    """An oracle whose reward is the number of groups a mask fine-tunes (references 0 and 2)."""

    def evaluate(self, trial):
        from memrl.searchers import Result

        return Result(float(trial.mask.sum()), 0.0, 0.0)

    def references(self):
        return 0.0, 2.0

    def prefetch(self, trials):
        pass
