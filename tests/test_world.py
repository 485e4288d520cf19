"""The world of base model v2: its data (distinct-image sources, a base mix disjoint from every
task), and metrics that noise cannot fool (a fixed encoder, calibrated extraction, KID controls,
resizes said out loud)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from memrl.config import ConfigError, load_config


def test_vendored_sources_are_distinct_labelled_images_in_one_vocabulary():
    from memrl.data import bundled
    from memrl.data.bundled import LABEL_OFFSET

    for name, n in (("fashion", 6000), ("animals", 2000)):
        s = bundled(name, 16)
        assert s.images.shape == (n, 1, 16, 16)
        assert sorted(s.labels.unique().tolist()) == [LABEL_OFFSET[name] + c for c in range(10)]
        flat = bundled(name, 28).images.flatten(1)
        assert len(torch.unique(flat, dim=0)) == n, name  # every image its own picture


def test_base_mix_never_holds_a_task_image_and_leaves_heldout_sources_out():
    """On base model v2 a task draws only images the base model was not pretrained on."""
    from memrl.data import load_splits
    from memrl.data.bundled import BASE_MIX, HELDOUT_SOURCES

    cfg = load_config("default")
    assert not set(HELDOUT_SOURCES) & set(BASE_MIX)
    base = load_splits(cfg.data).base
    assert set(base.meta["sources"]) == set(BASE_MIX)
    keys = {tuple(x.tolist()) for x in (base.images.flatten(1) * 1000).round().to(torch.int32)}
    for source in ("digits", "fashion", "histology"):
        splits = load_splits(load_config(cfg, {"data.source": source, "data.seed": 3}).data)
        for part in (splits.private, splits.heldout):
            rows = (part.images.flatten(1) * 1000).round().to(torch.int32)
            assert not any(tuple(r.tolist()) in keys for r in rows), source
    # v1 (data.base unset) keeps its MNIST base and its pools: the shipped 150-step table's rows
    v1 = load_splits(load_config("bench").data)
    assert v1.base.meta.get("base") is None and len(v1.base) == 2000


def test_data_base_and_extraction_quantile_are_validated():
    with pytest.raises(ConfigError, match=r"data\.base"):
        load_config("test", {"data.base": "everything"})
    with pytest.raises(ConfigError, match=r"metrics\.extraction_quantile=0\.9 must be in \[0, 0\.5\]"):
        load_config("test", {"metrics.extraction_quantile": 0.9})


def test_calibrated_extraction_threshold_matches_brute_force_and_ignores_unseen_images():
    from memrl.metrics.memorization import extraction_count, extraction_threshold, tiled_l2_distance

    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    heldout = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1
    t = extraction_threshold(train, heldout, 0.1)
    nearest = [min(float(tiled_l2_distance(h[None], x[None])) for x in train) for h in heldout]
    assert t == pytest.approx(float(np.quantile(nearest, 0.1)), rel=1e-5)
    # held-out images themselves, three of each, are mostly not "extracted"; copies are
    assert extraction_count(heldout.repeat(3, 1, 1, 1), train, t)[0] <= 3
    assert extraction_count(train[:4].repeat(3, 1, 1, 1), train, t)[0] == 4


def test_flat_samples_do_not_count_as_extracted_from_flat_training_images():
    """The failure the fixed threshold had: smooth patches matched smooth samples."""
    from memrl.metrics.memorization import extraction_count, extraction_threshold

    g = torch.Generator().manual_seed(1)

    def smooth(n):  # flat grey patches with faint noise: held-out patches look just like these
        return (
            torch.rand(n, 1, 1, 1, generator=g) * 0.2 + 0.01 * torch.randn(n, 1, 8, 8, generator=g)
        ).clamp(-1, 1)

    train, heldout, samples = smooth(40), smooth(40), smooth(30)
    assert extraction_count(samples, train, 0.15)[0] > 5  # the fixed threshold fires
    assert extraction_count(samples, train, extraction_threshold(train, heldout, 0.01))[0] <= 1


def test_quality_controls_rate_noise_and_constant_images_worst(ctx):
    from memrl.encoders import get_encoder
    from memrl.metrics.quality import quality_controls

    encoder = get_encoder(ctx.cfg, ctx.splits)
    kid = quality_controls(encoder, ctx.splits.heldout.images, ctx.splits.private.images, 8)
    assert kid["noise"] > 5 * abs(kid["real"]) and kid["constant"] > 5 * abs(kid["real"])


def test_domain_fidelity_places_samples_between_the_base_domain_and_the_data():
    """0 for another draw of the base model's domain, 1 for other images of the data's, and the
    same for a source the base model never saw (text) as for one it did (fashion)."""
    from memrl.data import bundled, load_splits
    from memrl.encoders import get_encoder
    from memrl.errors import DataError
    from memrl.metrics.quality import FAINT_VOTE, domain_fidelity

    cfg = load_config("default")
    encoder = get_encoder(cfg, load_splits(cfg.data))
    digits = bundled("digits", 16).images
    for source in ("fashion", "text"):
        data = bundled(source, 16).images
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        real, other = data[order[:64]], data[order[64:128]]
        base, base_again = digits[:64], digits[64:128]
        assert domain_fidelity(encoder, other, real, base)["fidelity"] > 0.8, source
        assert abs(domain_fidelity(encoder, base_again, real, base)["fidelity"]) < 0.2, source
        halfway = domain_fidelity(encoder, torch.cat([other[:32], base_again[:32]]), real, base)["fidelity"]
        assert 0.2 < halfway < 0.8, source
        assert domain_fidelity(encoder, other, real, base)["range"] > FAINT_VOTE, source
    # a "base model" that already draws the data: the vote cannot tell, and says it is faint
    assert domain_fidelity(encoder, other[:32], real, other[32:])["range"] < FAINT_VOTE
    assert domain_fidelity(encoder, other, real[:6], base)["fidelity"] > 0.5  # k cut to 5 of 6
    with pytest.raises(DataError, match="at least 4 held-out images"):
        domain_fidelity(encoder, other, real[:3], base)


def test_the_shipped_encoder_is_one_fixed_model_and_refuses_other_sizes():
    from memrl.data import load_splits
    from memrl.encoders import get_encoder, shipped_encoder_path

    cfg = load_config("default")
    assert cfg.encoder.kind == "shipped" and shipped_encoder_path().is_file()
    splits = load_splits(cfg.data)
    a = get_encoder(cfg, splits)
    b = get_encoder(load_config(cfg, {"data.source": "fashion"}), splits)
    assert a is b and a.num_features == 64
    with pytest.raises(ConfigError, match="encoder.kind=shipped was trained on 16 px"):
        load_config(cfg, {"data.resolution": 8})
    from memrl.config import SHIPPED_ENCODER_SIDE
    from memrl.encoders import SHIPPED_RESOLUTION

    assert SHIPPED_ENCODER_SIDE == SHIPPED_RESOLUTION


def test_a_resize_is_said_on_one_line(tmp_path, caplog):
    from memrl.data import load_npz

    np.savez(tmp_path / "big.npz", images=np.zeros((5, 64, 64), dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        load_npz(tmp_path / "big.npz", 16)
    said = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(said) == 1 and "5 of 5 images (64x64 px) to 16x16" in said[0]
    caplog.clear()
    np.savez(tmp_path / "fit.npz", images=np.zeros((5, 16, 16), dtype=np.uint8))
    load_npz(tmp_path / "fit.npz", 16)
    assert not [r for r in caplog.records if "resized" in r.getMessage()]


def test_a_checkpoint_during_a_finetune_does_not_change_it(cfg, ctx):
    """Measuring at a checkpoint (losses, sampling) leaves the run exactly as without it."""
    from memrl.finetune import finetune
    from memrl.metrics.memorization import denoising_loss
    from memrl.sampling import sample

    cfg.finetune.steps = 4
    data, prefixes = ctx.splits.finetune_set(), ctx.space.prefixes([1, 1, 1, 1])
    seen = []

    def checkpoint(model, n):
        seen.append(n)
        denoising_loss(model, data.images[:4], data.labels[:4], [100])
        sample(model, torch.tensor([0, 1]), steps=2)

    plain, _ = finetune(ctx.base, data, prefixes, cfg)
    checked, _ = finetune(ctx.base, data, prefixes, cfg, checkpoint)
    assert seen == [1, 2, 3, 4]
    assert plain.fingerprint() == checked.fingerprint()


def test_the_apply_report_shows_a_resized_image_before_and_after(tmp_path):
    from memrl.apply_policy import resize_figure

    np.savez(tmp_path / "x.npz", images=(np.arange(5 * 64 * 64) % 251).reshape(5, 64, 64).astype(np.uint8))
    text = resize_figure(str(tmp_path / "x.npz"), 16, tmp_path / "resized.png")
    assert "resized** from 64x64 px to the model's 16x16 px" in text and "![resized](resized.png)" in text
    assert (tmp_path / "resized.png").read_bytes()[:4] == b"\x89PNG"
    np.savez(tmp_path / "fit.npz", images=np.zeros((5, 16, 16), dtype=np.uint8))
    assert resize_figure(str(tmp_path / "fit.npz"), 16, tmp_path / "no.png") == ""
    assert not (tmp_path / "no.png").exists()


def test_a_link_to_a_device_among_the_images_is_skipped_with_a_warning(tmp_path, caplog):
    from PIL import Image

    from memrl.data import load_folder

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with caplog.at_level(logging.WARNING):
        images = load_folder(tmp_path, 8)
    assert len(images) == 3 and images.files == ["0.png", "1.png", "2.png"]
    assert any("skipped 1 entries" in r.getMessage() and "zero.png" in r.getMessage() for r in caplog.records)
