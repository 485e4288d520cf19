"""The command-line tools end to end on the tiny test config, through subprocess."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy()
    )


def train(out, *settings, report=True):
    """``python -m memrl.train_agent`` on the test config into ``out`` with extra overrides."""
    extra = [] if report else ["--no-report"]
    return run("memrl.train_agent", "--config", "test", "--run-dir", str(out), *extra, "--set", *settings)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    proc = train(out, "ppo.total_timesteps=8", "ppo.n_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def new_dataset(tmp_path_factory):
    """An .npz of real digits the policy never saw (scikit-learn digits, another selection)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = np.random.default_rng(7).permutation(len(d.images))[:120]
    path = tmp_path_factory.mktemp("data") / "new.npz"
    np.savez(path, images=(d.images[pick] * 16).clip(0, 255).astype(np.uint8), labels=d.target[pick])
    return path


def test_train_writes_a_complete_run(run_dir):
    for name in (
        "policy.zip",
        "policy.card.json",
        "config.yaml",
        "run.json",
        "evaluations.sqlite",
        "episodes.jsonl",
        "checkpoints/last.zip",
        "report.md",
        "pareto.png",
        "reward.png",
    ):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))
    episodes = [json.loads(x) for x in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 8 and all(len(e["mask"]) == 4 for e in episodes)
    card = json.loads((run_dir / "policy.card.json").read_text())
    assert card["action_mode"] == "mask" and len(card["search_space"]["groups"]) == 4
    assert card["num_timesteps"] == 8 and card["descriptor"]["fields"][0] == "log_size"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta["versions"] and meta["tasks"][0]["data"]
    report = (run_dir / "report.md").read_text()
    assert "## Chosen mask" in report and "not evaluated yet" not in report


def test_resume_continues_and_reuses_evaluations(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    proc = run("memrl.train_agent", "--resume", str(copy), "--set", "ppo.total_timesteps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((copy / "policy.card.json").read_text())
    assert card["num_timesteps"] == 12
    episodes = [json.loads(x) for x in (copy / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 12


def test_sequential_mode_trains_applies_and_reports(tmp_path, new_dataset):
    out = tmp_path / "seq"
    proc = train(out, "env.mode=sequential", "env.max_groups=2", "ppo.n_steps=4", "ppo.total_timesteps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "policy.card.json").read_text())["action_mode"] == "sequential"
    from memrl.agents import load_policy

    (mask,) = load_policy(out).propose(str(new_dataset))
    assert mask.shape == (4,) and mask.sum() <= 2


def test_parallel_envs_in_subprocesses(tmp_path):
    out = tmp_path / "par"
    proc = train(out, "ppo.n_envs=2", "ppo.n_steps=2", "ppo.total_timesteps=4", report=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 4


def test_policy_proposes_masks_from_python(run_dir, new_dataset):
    from memrl.agents import load_policy

    policy = load_policy(run_dir / "policy.zip")
    masks = policy.propose(str(new_dataset), n=3)
    assert len(masks) == 3 and all(m.shape == (4,) for m in masks)
    assert len({tuple(m) for m in masks}) == 3


def test_apply_policy_on_a_new_dataset(run_dir, new_dataset, tmp_path):
    out = tmp_path / "applied"
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir / "policy.zip"),
        "--data",
        str(new_dataset),
        "--out",
        str(out),
        "--candidates",
        "2",
        "--budget",
        "2",
        "--steps",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    result = json.loads((out / "result.json").read_text())
    assert len(result["mask"]) == 4 and len(result["candidates_tried"]) == 2
    assert set(result["chosen"]) >= {"canary_copy_fraction", "kid", "trainable_fraction"}
    assert result["full_finetune"]["trainable_fraction"] == 1.0  # every UNet parameter
    assert 0 <= result["chosen"]["trainable_fraction"] < 1
    from memrl.models import load_model

    assert load_model(out / "model").resolution == 8
    assert "| metric | chosen mask | full fine-tune (every parameter) |" in (out / "report.md").read_text()


def test_policy_from_another_search_space_is_refused(run_dir, new_dataset, tmp_path):
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        str(new_dataset),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "search.granularity=block",
    )
    assert proc.returncode == 2
    assert "trained on another search space" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_or_corrupt_policy_and_empty_data_are_explained(run_dir, new_dataset, tmp_path):
    proc = run("memrl.apply_policy", "--policy", str(tmp_path / "none.zip"), "--data", str(new_dataset))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "policy.zip"
    bad.write_bytes(b"garbage")
    (tmp_path / "policy.card.json").write_text((run_dir / "policy.card.json").read_text())
    proc = run("memrl.apply_policy", "--policy", str(bad), "--data", str(new_dataset))
    assert proc.returncode == 2 and "not a readable memrl policy" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(
        "memrl.apply_policy", "--policy", str(run_dir), "--data", str(empty), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "no images found" in proc.stderr and "Traceback" not in proc.stderr


def test_policy_zip_holds_only_weights_we_read_safely(run_dir):
    with zipfile.ZipFile(run_dir / "policy.zip") as zf:
        assert "policy.pth" in zf.namelist()


def test_bad_config_override_is_explained(tmp_path):
    proc = run(
        "memrl.train_agent", "--config", "test", "--set", "ppo.n_stepz=3", "--run-dir", str(tmp_path / "r")
    )
    assert proc.returncode == 2 and "unknown field ppo.n_stepz" in proc.stderr


@pytest.mark.parametrize("method", ["random", "optuna-nsga2"])
def test_search_cli(method, tmp_path):
    out = tmp_path / method
    proc = run("memrl.search", "--method", method, "--budget", "3", "--config", "test", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / f"search-{method}.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 and "reward" in lines[0]
    assert (out / "report.md").is_file() and (out / "evaluations.sqlite").is_file()


@pytest.mark.parametrize(
    "method,budget,rows", [("optuna-tpe", 3, 3), ("optuna-gp", 3, 3), ("exhaustive", 16, 16), ("fixed", 7, 7)]
)
def test_other_baselines_share_the_store(method, budget, rows, tmp_path):
    from memrl.agents.baselines import run_search

    from memrl.config import load_config

    cfg = load_config("test", {"env.store": str(tmp_path / "s.sqlite")})
    result = run_search(cfg, method, budget)
    assert len(result) == rows
    assert all(r["ok"] for r in result)
    if method == "exhaustive":
        assert len({tuple(r["mask"]) for r in result}) == 16
    if method == "fixed":
        assert {r["method"] for r in result} >= {"full", "lora", "svdiff"}
    again = run_search(cfg, "random", 2)
    assert all(r["cache_hit"] for r in again) or method != "exhaustive"


def test_report_cli(run_dir):
    proc = run("memrl.report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("report.md")
