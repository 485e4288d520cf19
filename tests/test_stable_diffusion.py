"""The Stable Diffusion path on a tiny random pipeline folder, used exactly as a user's folder."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest

import memrl  # noqa: F401
from memrl.config import load_config
from memrl.errors import ModelError
from memrl.testing import run_module


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from memrl.models.stable_diffusion import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def sd_overrides(pipeline, tmp_path, **extra):
    return {
        "model.path": str(pipeline),
        "data.resolution": 16,
        "data.channels": 3,
        "data.base_size": 16,
        "data.caption_template": "a photo of the digit {}",
        "search.granularity": "transformer",
        "env.store": str(tmp_path / "s.sqlite"),
        **extra,
    }


def test_an_env_step_fine_tunes_the_pipeline_unet_on_latents(pipeline, tmp_path):
    env = gym.make("MemControl-v0", config="test", overrides=sd_overrides(pipeline, tmp_path))
    assert env.action_space == gym.spaces.MultiBinary(4)  # the tiny pipeline's attention blocks
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(np.array([1, 0, 0, 1], dtype=np.int8))
    assert terminated and info["ok"], info["error"]
    assert np.isfinite(reward) and 0 < info["trainable_percent"] < 100
    ctx = env.unwrapped.task.context
    assert ctx.model_splits.private.images.shape[1:] == (4, 8, 8)  # VAE latents
    assert ctx.splits.private.images.shape[1:] == (3, 16, 16)  # scored as images
    assert ctx.prompts[-1] == "" and "a photo of the digit 3" in ctx.prompts
    assert env.unwrapped._last.samples.shape[1:] == (3, 16, 16)  # samples decoded through the VAE
    assert ctx.fingerprints["base_model"] == ctx.sd.fingerprint


def test_latents_and_prompts_are_cached(pipeline, tmp_path):
    from memrl.models.stable_diffusion import encode_latents, encode_prompts, load_components

    parts = load_components(str(pipeline.resolve()))
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    import torch

    first = encode_latents(parts, torch.from_numpy(images))
    assert first.shape == (3, 4, 8, 8)
    assert torch.equal(encode_latents(parts, torch.from_numpy(images)), first)
    table = encode_prompts(parts, ["a", ""])
    assert table.shape == (2, 16, 16) and torch.equal(encode_prompts(parts, ["a", ""]), table)


def test_apply_policy_and_search_on_the_pipeline_and_the_merged_folder_loads(pipeline, tmp_path):
    sets = [f"{k}={v}" for k, v in sd_overrides(pipeline, tmp_path).items() if k != "env.store"]

    def run(*args):
        return run_module(*args, OMP_NUM_THREADS="1")

    proc = run(
        "memrl.search",
        "--method",
        "random",
        "--budget",
        "2",
        "--config",
        "test",
        "--out",
        str(tmp_path / "search"),
        "--set",
        *sets,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = run(
        "memrl.train_agent",
        "--config",
        "test",
        "--run-dir",
        str(run_dir),
        "--no-report",
        "--set",
        "ppo.total_timesteps=4",
        "ppo.n_steps=4",
        *sets,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "applied"
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        "digits",
        "--out",
        str(out),
        "--budget",
        "1",
        "--steps",
        "2",
        "--sweep",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["chosen"]["trainable_fraction"] > 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    images = pipe(
        "a photo of the digit 3", num_inference_steps=2, height=16, width=16, output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_bad_pipeline_folders_are_explained(pipeline, tmp_path):
    from memrl.models.stable_diffusion import load_components

    for part, message in (("vae", "vae missing"), ("tokenizer", "tokenizer missing")):
        broken = tmp_path / f"no-{part}"
        shutil.copytree(pipeline, broken)
        shutil.rmtree(broken / part)
        with pytest.raises(ModelError, match=message):
            load_components(str(broken))
    wrong = tmp_path / "wrong-unet"
    shutil.copytree(pipeline, wrong)
    config = json.loads((wrong / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 24
    (wrong / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot load this unet|different models"):
        load_components(str(wrong))


def test_options_real_gpus_need_are_config():
    cfg = load_config("stable_diffusion")
    assert cfg.finetune.mixed_precision == "bf16" and cfg.finetune.gradient_checkpointing
    assert load_config("test", {"finetune.mixed_precision": "fp16"}).finetune.mixed_precision == "fp16"
    from memrl.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.mixed_precision='fp8'"):
        load_config("test", {"finetune.mixed_precision": "fp8"})


def test_captions_come_from_captions_csv_then_the_class_template(tmp_path):
    from PIL import Image

    from memrl.data import load_folder
    from memrl.models.stable_diffusion import captions_of

    for cls in ("effusion", "normal"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "captions.csv").write_text(
        "file,caption\neffusion/0.png,a chest x-ray with a large effusion\n"
    )
    images = load_folder(tmp_path, 8)
    assert captions_of(images, "an x-ray, {}") == [
        "a chest x-ray with a large effusion",
        "an x-ray, effusion",
        "an x-ray, normal",
        "an x-ray, normal",
    ]
    assert captions_of(images, None)[1] == "a photo of a effusion"
