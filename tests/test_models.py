import subprocess
import sys
import textwrap

import pytest
import torch

from memrl.finetune import finetune
from memrl.models import ModelError, load_model
from memrl.sampling import sample
from memrl.search_space import SearchSpace


def test_base_model_is_cached_and_reloads_identically(cfg, ctx, tmp_path):
    from memrl.models import _LOADED, get_base_model

    _LOADED.clear()
    again = get_base_model(cfg, ctx.splits)  # from the cache folder this time
    assert again is not ctx.base
    assert again.fingerprint() == ctx.base.fingerprint()
    ctx.base.save(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert load_model(tmp_path / "m").fingerprint() == ctx.base.fingerprint()


def test_a_plain_diffusers_unet_folder_loads(ctx, tmp_path):
    ctx.base.unet.save_pretrained(tmp_path / "unet_only")
    model = load_model(tmp_path / "unet_only")
    assert model.num_classes == 10
    x = torch.zeros(2, 1, 8, 8)
    assert model(x, torch.tensor([1, 2]), torch.tensor([0, 10])).shape == x.shape
    with pytest.raises(ModelError, match="no diffusers UNet here"):
        load_model(tmp_path / "missing")


def test_sd15_config_gives_16_transformer_groups():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    sd15 = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    with init_empty_weights():
        unet = UNet2DConditionModel(**sd15)
    space = SearchSpace(unet, "transformer")
    assert space.k == 16
    assert space.names[0] == "down_blocks.0.attentions.0"
    assert space.names[6] == "mid_block.attentions.0"
    assert 800e6 < space.total_params < 900e6
    assert SearchSpace(unet, "block").k == 4 + 1 + 4 + 3  # down, mid, up, conv_in/time/conv_out


def test_search_space_masks(ctx):
    space = SearchSpace(ctx.base.unet, "transformer")
    assert space.k == len(space) == 4
    mask = space.mask_from_groups([space.names[1]])
    assert space.selected(mask) == [space.names[1]]
    assert 0 < space.group_fraction(mask) < space.group_fraction([1, 1, 1, 1]) < 1
    assert space.signature != SearchSpace(ctx.base.unet, "transformer", "lora").signature
    with pytest.raises(ValueError, match=r"needs \(4,\)"):
        space.validate([1, 0])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        space.validate([2, 0, 0, 0])
    assert [g.split(".")[0] for g in SearchSpace(ctx.base.unet, "block").names] == [
        "conv_in",
        "time_embedding",
        "down_blocks",
        "down_blocks",
        "mid_block",
        "up_blocks",
        "up_blocks",
        "conv_out",
    ]


def test_finetune_leaves_base_untouched_and_is_deterministic(cfg, ctx):
    before = ctx.base.fingerprint()
    prefixes = ctx.space.prefixes([1, 1, 1, 1])
    a, ra = finetune(ctx.base, ctx.splits.finetune_set(), prefixes, cfg)
    b, rb = finetune(ctx.base, ctx.splits.finetune_set(), prefixes, cfg)
    assert ctx.base.fingerprint() == before
    assert ra.losses == rb.losses and len(ra.losses) == cfg.finetune.steps
    assert a.fingerprint() == b.fingerprint() != before
    assert 0 < ra.trainable_fraction < 1


def test_nan_guard_stops_and_reports(cfg, ctx):
    data = ctx.splits.finetune_set()
    data.images[:] = float("nan")
    _, result = finetune(ctx.base, data, ctx.space.prefixes([1, 0, 0, 0]), cfg)
    assert result.diverged and "non-finite loss at step 0" in result.stop_reason


def test_sampling_shape_range_and_seed(ctx):
    labels = torch.tensor([0, 1, 2])
    a = sample(ctx.base, labels, steps=3, seed=1)
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, sample(ctx.base, labels, steps=3, seed=1))
    assert not torch.equal(a, sample(ctx.base, labels, steps=3, seed=2))


GROUPNORM_SCRIPT = textwrap.dedent("""
    import torch
    from memrl.models import install_groupnorm_guard
    # torch 2.13's three-line crash (exit 139 without the guard): a non-contiguous input that
    # needs no grad into a GroupNorm whose affine parameters do.
    norm = torch.nn.Sequential(torch.nn.GroupNorm(8, 64))
    install_groupnorm_guard(norm)
    x = torch.randn(32, 16, 64).transpose(1, 2).reshape(32, 64, 4, 4)
    norm(x).square().sum().backward()
    assert norm[0].weight.grad is not None
    from memrl.config import load_config
    from memrl.evaluate import TaskContext
    from memrl.finetune import finetune
    cfg = load_config("test", {"search.granularity": "block", "finetune.steps": 1})
    ctx = TaskContext.get(cfg)
    _, r = finetune(ctx.base, ctx.splits.finetune_set(), ctx.space.prefixes(
        ctx.space.mask_from_groups(["mid_block"])), cfg)
    assert r.trainable_params > 0 and len(r.losses) == 1
    print("ok")
""")


def test_only_mid_block_trainable_does_not_segfault():
    """torch 2.13 CPU segfaults in GroupNorm backward on non-contiguous frozen inputs; the guard
    in memrl.models prevents it. A crash here is exit code -11 (139 in a shell). Also trains with
    only the mid block unfrozen, the case the guard exists for."""
    proc = subprocess.run([sys.executable, "-c", GROUPNORM_SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
