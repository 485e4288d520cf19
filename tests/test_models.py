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
    from memrl.models import get_base_model
    from memrl.models.base import _LOADED

    _ = ctx.base  # loaded (and cached on disk) before the in-process cache is cleared
    _LOADED.clear()
    again = get_base_model(cfg, ctx.splits)  # from the cache folder this time
    assert again is not ctx.base
    assert again.fingerprint() == ctx.base.fingerprint()
    ctx.base.save(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert load_model(tmp_path / "m").fingerprint() == ctx.base.fingerprint()


def test_the_pretraining_seed_is_part_of_the_cache_key(cfg, ctx):
    from memrl.config import load_config
    from memrl.models import base_model_key

    reseeded = load_config(cfg, {"model.seed": 1})
    assert base_model_key(reseeded, ctx.splits) != base_model_key(cfg, ctx.splits)
    assert base_model_key(load_config(cfg, {"seed": 7}), ctx.splits) == base_model_key(cfg, ctx.splits)


@pytest.mark.parametrize("config,folder", [("default", "base_model_v2"), ("bench", "base_model")])
def test_both_shipped_base_models_load_without_pretraining(monkeypatch, tmp_path, config, folder):
    """The default config uses base model v2; the shipped 150-step table's config keeps v1."""
    import json

    from memrl.config import load_config
    from memrl.data import load_splits
    from memrl.models import base
    from memrl.models.base import get_base_model, shipped_folder

    monkeypatch.setenv("MEMRL_CACHE", str(tmp_path))
    monkeypatch.setattr(base, "pretrain_base_model", lambda *a: pytest.fail("pretrained instead of loading"))
    cfg = load_config(config)
    model = get_base_model(cfg, load_splits(cfg.data))
    provenance = json.loads((shipped_folder(folder) / "provenance.json").read_text())
    assert model.fingerprint() == provenance["weights_fingerprint"]
    assert model.num_classes == cfg.model.num_classes
    assert provenance["pretrain_steps"] == cfg.model.pretrain_steps and isinstance(
        provenance["seconds"], float
    )
    assert not (tmp_path / "models").exists()


def test_a_model_with_nan_weights_is_never_saved(tiny_model, tmp_path):
    with torch.no_grad():
        next(tiny_model.unet.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ModelError, match="NaN or infinite weights"):
        tiny_model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_plain_diffusers_unet_folder_loads(tiny_model, tmp_path):
    tiny_model.unet.save_pretrained(tmp_path / "unet_only")
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


def test_search_space_masks(tiny_model):
    space = SearchSpace(tiny_model.unet, "transformer")
    assert space.k == len(space) == 4
    mask = space.mask_from_groups([space.names[1]])
    assert space.selected(mask) == [space.names[1]]
    assert 0 < space.group_fraction(mask) < space.group_fraction([1, 1, 1, 1]) < 1
    assert space.signature != SearchSpace(tiny_model.unet, "transformer", "lora").signature
    with pytest.raises(ValueError, match=r"needs \(4,\)"):
        space.validate([1, 0])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        space.validate([2, 0, 0, 0])
    assert [g.split(".")[0] for g in SearchSpace(tiny_model.unet, "block").names] == [
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


def test_a_switchable_run_trains_exactly_the_groups_of_each_moment(cfg, ctx):
    """A run that may change its groups (finetune's may_train) is the plain run while they stay
    fixed; after set_trainable, the groups left out do not move and the ones added do."""
    from memrl.finetune import set_trainable

    data, space = ctx.splits.finetune_set(), ctx.space
    first, every = space.prefixes([1, 1, 0, 0]), space.prefixes([1, 1, 1, 1])
    plain, _ = finetune(ctx.base, data, first, cfg)
    held, _ = finetune(ctx.base, data, first, cfg, may_train=every)
    assert held.fingerprint() == plain.fingerprint()

    def params(model, prefixes):
        return {
            n: p.detach().clone()
            for n, p in model.unet.named_parameters()
            if any(n == q or n.startswith(q + ".") for q in prefixes)
        }

    seen = {}

    def switch(model, n):  # after update 1: train the third group only, then nothing
        if n == 1:
            seen["after 1"] = params(model, every)
            set_trainable(model, space.prefixes([0, 0, 1, 0]))
        elif n == 2:
            seen["after 2"] = params(model, every)
            set_trainable(model, [])

    switched, result = finetune(ctx.base, data, first, cfg.with_changes({"finetune.steps": 3}), switch, every)
    one, two, three = seen["after 1"], seen["after 2"], params(switched, every)

    def moved(a, b, prefixes):
        return any(not torch.equal(a[n], b[n]) for n in params(switched, prefixes))

    assert moved(params(ctx.base, every), one, space.prefixes([1, 1, 0, 0]))  # update 1 trained the first two
    assert not moved(params(ctx.base, every), one, space.prefixes([0, 0, 1, 1]))
    assert moved(one, two, space.prefixes([0, 0, 1, 0]))  # update 2 trained the third only
    assert not moved(one, two, space.prefixes([1, 1, 0, 1]))
    assert not moved(two, three, every) and len(result.losses) == 2  # update 3 trained nothing
    with pytest.raises(ValueError, match="may_train"):
        set_trainable(plain, first)


def test_nan_guard_stops_and_reports(cfg, ctx):
    data = ctx.splits.finetune_set()
    data.images[:] = float("nan")
    _, result = finetune(ctx.base, data, ctx.space.prefixes([1, 0, 0, 0]), cfg)
    assert result.diverged and "non-finite loss at step 0" in result.stop_reason


def test_sampling_shape_range_and_seed(tiny_model):
    labels = torch.tensor([0, 1, -1])
    a = sample(tiny_model, labels, steps=3, seed=1)
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, sample(tiny_model, labels, steps=3, seed=1))
    assert not torch.equal(a, sample(tiny_model, labels, steps=3, seed=2))


def test_unconditional_sampling_runs_one_branch_with_the_guided_result_bit_for_bit(tiny_model):
    from memrl.training import noise_scheduler

    labels = torch.full((6,), -1)
    calls = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    try:
        fast = sample(tiny_model, labels, steps=3, guidance=2.0, seed=4)
    finally:
        hook.remove()
    assert calls == [6, 6, 6]  # one batch of 6 per step, not 12
    # the guided two-branch loop every stored row was sampled with
    sched = noise_scheduler(tiny_model, "ddim")
    sched.set_timesteps(3)
    null = torch.full((6,), tiny_model.null_label)
    x = torch.randn((6, tiny_model.channels, 8, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in sched.timesteps:
            cond, uncond = tiny_model(torch.cat([x, x]), t.expand(12), torch.cat([null, null])).chunk(2)
            x = sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    assert torch.equal(fast, x.clamp(-1, 1))


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
    from memrl.finetune import finetune
    from memrl.task import TaskContext
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
