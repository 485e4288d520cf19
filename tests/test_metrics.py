import numpy as np
import pytest
import torch

from memrl.encoders import PixelEncoder, embed, get_encoder, train_contrastive
from memrl.finetune import finetune
from memrl.metrics.memorization import (
    NearestNeighbourIndex,
    copy_scores,
    copy_threshold,
    denoising_loss,
    extraction_count,
    noise_norm,
    tiled_l2_distance,
)
from memrl.metrics.quality import fid_kid


def test_faiss_flat_matches_torch_brute_force():
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(500, 32, generator=g), torch.randn(40, 32, generator=g)
    fs, fi = NearestNeighbourIndex(train, "faiss").search(queries, 5)
    ts, ti = NearestNeighbourIndex(train, "torch").search(queries, 5)
    assert torch.equal(fi, ti)
    assert torch.allclose(fs, ts, atol=1e-5)
    # brute force by hand
    ref = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    assert torch.equal(ref.argmax(1), ti[:, 0])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(kind):
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(4000, 16, generator=g), torch.randn(100, 16, generator=g)
    _, exact = NearestNeighbourIndex(train, "torch").search(queries, 1)
    _, approx = NearestNeighbourIndex(train, "faiss", index=kind, nprobe=16).search(queries, 1)
    assert (exact == approx).float().mean() >= 0.9


def test_torch_backend_rejects_approximate_index():
    with pytest.raises(ValueError, match="needs the faiss backend"):
        NearestNeighbourIndex(torch.randn(5, 3), "torch", index="ivf")


@pytest.fixture(scope="module")
def trained_encoder(ctx):
    s = ctx.splits
    images = torch.cat([s.base.images, s.private.images, s.heldout.images])
    return train_contrastive(images, dim=32, steps=150, batch_size=128, seed=0)


def test_copies_score_as_memorized_and_heldout_images_do_not(ctx, trained_encoder):
    s = ctx.splits
    index = NearestNeighbourIndex(embed(trained_encoder, s.private))
    threshold = copy_threshold(index, embed(trained_encoder, s.heldout), 0.99)
    exact = copy_scores(embed(trained_encoder, s.private), index, threshold)
    assert exact.near_copy_fraction == 1.0 and exact.distinct_copied == len(s.private)
    held = copy_scores(embed(trained_encoder, s.heldout), index, threshold)
    assert held.near_copy_fraction <= 0.05
    g = torch.Generator().manual_seed(0)
    noisy = (s.private.images + 0.05 * torch.randn(s.private.images.shape, generator=g)).clamp(-1, 1)
    assert copy_scores(embed(trained_encoder, noisy), index, threshold).near_copy_fraction >= 0.8
    shifted = torch.roll(s.private.images, shifts=1, dims=3)
    shifted_scores = copy_scores(embed(trained_encoder, shifted), index, threshold)
    assert shifted_scores.nn_similarity_mean > held.nn_similarity_mean


def test_canary_copy_fraction_counts_only_canary_hits(ctx):
    enc = PixelEncoder(1, 8)
    s = ctx.splits
    index = NearestNeighbourIndex(embed(enc, s.private), "torch")
    samples = torch.cat([s.private.images[s.canary_index], s.heldout.images[:2]])
    is_canary = torch.tensor([True] * len(s.canary_index) + [False, False])
    scores = copy_scores(embed(enc, samples), index, 0.999, s.canary_index, is_canary)
    assert scores.canary_copy_fraction == 1.0


def test_tiled_l2_and_extraction():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    assert tiled_l2_distance(train, train).diagonal().abs().max() < 1e-5
    samples = torch.cat(
        [
            train[2:3].repeat(3, 1, 1, 1),
            train[4:5].repeat(2, 1, 1, 1),
            torch.rand(3, 1, 8, 8, generator=g) * 2 - 1,
        ]
    )
    extracted, frac = extraction_count(samples, train, threshold=0.05)
    assert extracted == 1  # image 2 is matched by a clique of 3; image 4 only by 2
    assert frac == pytest.approx(5 / 8)


def test_fid_of_a_set_against_itself_is_small_and_against_another_domain_large(ctx, trained_encoder):
    s = ctx.splits
    same = fid_kid(trained_encoder, s.heldout.images, s.heldout.images, kid_subset_size=16)
    other = fid_kid(trained_encoder, s.base.images[:64], s.heldout.images, kid_subset_size=16)
    noise = fid_kid(trained_encoder, torch.rand(64, 1, 8, 8) * 2 - 1, s.heldout.images, 16)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.02  # KID is unbiased: can dip below 0
    assert noise["fid"] > other["fid"] > 10 * abs(same["fid"])
    assert noise["kid"] > 0.05


def test_encoder_is_cached_by_dataset(cfg, ctx):
    a = get_encoder(cfg, ctx.splits)
    assert get_encoder(cfg, ctx.splits) is a
    cfg.data.seed = 3
    from memrl.data import load_splits

    assert get_encoder(cfg, load_splits(cfg.data)) is not a


def test_an_encoder_with_non_finite_weights_is_never_cached(cfg, ctx):
    import dataclasses
    from pathlib import Path

    from memrl.encoders import encoder_key
    from memrl.utils import cache_dir

    poisoned = dataclasses.replace(
        ctx.splits, heldout=ctx.splits.heldout.subset(range(len(ctx.splits.heldout)))
    )
    poisoned.heldout.images[0, 0, 0, 0] = float("nan")
    cfg.encoder.seed = 99  # a key no other test uses
    with pytest.raises(RuntimeError, match="non-finite weights"):
        get_encoder(cfg, poisoned)
    assert not Path(cache_dir() / "encoders" / f"{encoder_key(cfg, poisoned)}.safetensors").exists()


def test_noise_norm_is_zero_for_the_null_label(ctx):
    null = torch.full((3,), ctx.base.null_label)
    assert noise_norm(ctx.base, null, [100, 500]).abs().max() == 0
    assert noise_norm(ctx.base, torch.tensor([1, 2, 3]), [100, 500]).min() > 0


def test_long_finetune_on_duplicated_canaries_memorizes_them(cfg, ctx):
    """Fast version: the canaries' loss gap grows with their duplication (and above the base)."""
    import dataclasses

    s = ctx.splits
    cfg.finetune.steps, cfg.finetune.lr = 120, 3e-3
    steps = [100, 300, 500]

    def canary_gap(model):
        held = denoising_loss(model, s.heldout.images, s.heldout.labels, steps).mean()
        return float(held - denoising_loss(model, s.canaries.images, s.canaries.labels, steps).mean())

    gaps = {}
    for dup in (1, 20):
        data = dataclasses.replace(s, duplication=dup).finetune_set()
        model, _ = finetune(ctx.base, data, ctx.space.prefixes([1, 1, 1, 1]), cfg)
        gaps[dup] = canary_gap(model)
    assert gaps[20] > gaps[1] + 0.015
    assert gaps[20] > canary_gap(ctx.base) + 0.015


@pytest.mark.slow
def test_full_finetune_on_the_default_copies_canaries_and_a_sparse_mask_does_not(user_cache):
    """Slow (about a minute; the default base UNet ships with memrl): the embedded default's
    calibration, one seed."""
    import numpy as np

    from memrl.config import load_config
    from memrl.scoring import evaluate_spec
    from memrl.task import TaskContext

    ctx = TaskContext.get(load_config("default"))
    full = evaluate_spec(ctx.spec(np.ones(ctx.space.k, int)))
    mid = evaluate_spec(ctx.spec(ctx.space.mask_from_groups(["mid_block.attentions.0"])))
    assert full.metrics["canary_copy_fraction"] > 0.1 and full.metrics["extracted"] >= 1
    assert mid.metrics["canary_copy_fraction"] == 0
    assert full.metrics["canary_loss_gap"] > mid.metrics["canary_loss_gap"] + 0.02


def test_a_torchscript_model_file_is_a_pluggable_encoder(cfg, ctx, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1))
    torch.jit.save(torch.jit.script(net), tmp_path / "enc.pt")
    cfg.encoder.kind, cfg.encoder.path, cfg.encoder.input_size = "torchscript", str(tmp_path / "enc.pt"), 12
    encoder = get_encoder(cfg, ctx.splits)
    assert encoder.num_features == 5
    features = embed(encoder, ctx.splits.private)
    assert features.shape == (len(ctx.splits.private), 5)
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features)))
    cfg.encoder.path = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no such TorchScript file"):
        get_encoder(cfg, ctx.splits)


def test_membership_auc_and_tpr_match_hand_computed_values():
    from memrl.metrics.membership import membership_auc, membership_metrics, tpr_at_fpr

    members = torch.tensor([0.1, 0.2, 0.5])  # lower loss: more likely a member
    others = torch.tensor([0.3, 0.5, 0.6, 0.7])
    # pairs (member < other): 0.1 beats 4, 0.2 beats 4, 0.5 beats 2 and ties 1 -> (10 + 0.5) / 12
    assert membership_auc(members, others) == pytest.approx(10.5 / 12)
    assert membership_auc(others, members) == pytest.approx(1.5 / 12)
    # fpr 0: threshold at the lowest held-out loss (0.3): members 0.1 and 0.2 are caught
    assert tpr_at_fpr(members, others, 0.0) == pytest.approx(2 / 3)
    # fpr 0.25 lets one held-out image through (0.3); threshold 0.5, which is not strictly below
    assert tpr_at_fpr(members, others, 0.25) == pytest.approx(2 / 3)
    assert tpr_at_fpr(members, others, 0.5) == pytest.approx(1.0)
    assert membership_auc(members[:0], others) != membership_auc(members[:0], others)  # NaN
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(members, others, 1.0)
    private = torch.tensor([0.1, 0.9, 0.2, 0.8])
    got = membership_metrics(private, others, torch.tensor([True, False, True, False]))
    assert got["mia_auc_canary"] == pytest.approx(1.0)
    assert got["mia_tpr_canary"] == pytest.approx(1.0)
    assert got["mia_auc_private"] == pytest.approx(8 / 16)  # 0.1, 0.2 below every held-out loss


def test_calibrated_attack_ignores_images_that_are_merely_easy():
    from memrl.metrics.membership import calibrated_losses, membership_auc

    # the members are easy for the reference model too and the fine-tune cut every loss by half:
    # the raw attack calls them members, the calibrated one sees no difference
    ref_members, ref_others = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7, 0.8])
    members, others = ref_members / 2, ref_others / 2
    assert membership_auc(members, others) == 1.0
    calibrated = calibrated_losses(members, ref_members), calibrated_losses(others, ref_others)
    assert np.allclose(calibrated[0], np.log(0.5)) and membership_auc(*calibrated) == 0.5
    # hard members whose loss fell by 4 (the others' by 2) are found only after calibration
    ref_members = np.array([1.6, 1.8, 2.0])
    members = ref_members / 4
    assert membership_auc(members, others) < 0.5
    assert membership_auc(calibrated_losses(members, ref_members), calibrated[1]) == 1.0
    with pytest.raises(ValueError, match="3 losses against 4"):
        calibrated_losses(members, ref_others)
