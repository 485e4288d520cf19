"""The command-line tools end to end on the tiny test config, through subprocess."""

import itertools
import json
import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from memrl.testing import run_module as run
from memrl.testing import wait_until


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
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["num_timesteps"] == 8
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
    from memrl.runs import RunFolder

    folder = RunFolder(run_dir)  # the one place that names a run's files names these
    for path in (folder.config, folder.record, folder.store, folder.episodes, folder.checkpoint, folder.log):
        assert path.is_file(), path
    assert folder.policy.is_file() and folder.report.is_file() and folder.figure("pareto").is_file()
    assert "PPO: 8 of 8 timesteps (100%)" in folder.log.read_text()  # progress reaches the log file
    episodes = [json.loads(x) for x in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 8 and all(len(e["mask"]) == 4 for e in episodes)
    card = json.loads((run_dir / "policy.card.json").read_text())
    assert card["action_mode"] == "mask" and len(card["search_space"]["groups"]) == 4
    assert card["num_timesteps"] == 8 and card["descriptor"]["fields"][0] == "log_size"
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
    (other,) = load_policy(out).propose(str(new_dataset), preference=[1.0, 0.0, 0.0])
    assert other.shape == (4,)


def test_a_search_policy_trains_and_searches_live_with_apply_policy(tmp_path, new_dataset):
    out = tmp_path / "search"
    proc = train(
        out, "env.mode=search", "env.budget=2", "ppo.n_steps=4", "ppo.total_timesteps=8", report=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "policy.card.json").read_text())
    assert card["action_mode"] == "search" and card["config"]["env"]["budget"] == 2

    def apply(folder, *extra):
        args = ["--policy", str(out), "--data", str(new_dataset), "--out", str(folder), "--sweep", "0"]
        return run("memrl.apply_policy", *args, "--steps", "3", *extra)

    results = tmp_path / "applied"
    proc = apply(results, "--budget", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fine-tune ") == 3 and "best so far" in proc.stdout
    result = json.loads((results / "result.json").read_text())
    trace = result["search_trace"]
    assert len(trace) == 3 and len({tuple(t["mask"]) for t in trace}) == 3  # no mask evaluated twice
    best = max(t["reward"] for t in trace)
    assert trace[-1]["best_so_far"] >= best and all(
        a <= b for a, b in zip([t["best_so_far"] for t in trace], [t["best_so_far"] for t in trace][1:])
    )
    assert (results / "search.png").read_bytes()[:4] == b"\x89PNG" and "## The search" in (
        results / "report.md"
    ).read_text()
    assert 0 <= result["chosen"]["mia_auc_private"] <= 1 and result["split_duplicates"]["exact"] == 0
    zero = tmp_path / "zero"
    proc = apply(zero)
    assert proc.returncode == 0 and "search_trace" not in json.loads((zero / "result.json").read_text())
    tpe = tmp_path / "tpe"  # any registered searcher, live, beside the policy
    proc = apply(tpe, "--budget", "2", "--searcher", "tpe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tpe / "result.json").read_text())["search_trace"]) == 2
    proc = apply(tmp_path / "bad", "--budget", "2", "--searcher", "sac")
    assert proc.returncode == 2 and "searcher 'sac' is not one of" in proc.stderr


def test_apply_policy_warns_when_held_out_images_duplicate_training_images(run_dir, tmp_path):
    images = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 8, 8), dtype=np.uint8), 16, axis=0)
    np.savez(tmp_path / "same.npz", images=images)
    out = tmp_path / "o"
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        str(tmp_path / "same.npz"),
        "--out",
        str(out),
        "--sweep",
        "0",
        "--steps",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out images are exact" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["split_duplicates"]["exact"] == result["heldout"] == 4
    assert "Warning: 4 of the 4 held-out images are exact" in (out / "report.md").read_text()


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


def test_apply_policy_delivers_a_model_trained_on_all_but_the_heldout_images(run_dir, new_dataset, tmp_path):
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
        "--memorization-weight",
        "0.8",
        "--sweep",
        "3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    result = json.loads((out / "result.json").read_text())
    assert len(result["mask"]) == 4 and len(result["candidates_tried"]) == 2
    assert result["preference"]["memorization_weight"] == pytest.approx(0.8)
    assert result["preference"]["quality_weight"] == pytest.approx(0.2)
    assert [r["memorization_weight"] for r in result["sweep"]] == [0.0, 0.5, 1.0]
    assert (out / "preferences.png").read_bytes()[:4] == b"\x89PNG"
    assert "## The policy's masks across trade-offs" in (out / "report.md").read_text()
    # 120 images: 24 held out, the other 96 fine-tuned on, without canaries or duplication
    assert (result["images"], result["heldout"], result["finetuned_on"]) == (120, 24, 96)
    config = (out / "config.yaml").read_text()
    assert "canaries: 0" in config and "duplication: 1" in config
    assert set(result["chosen"]) >= {"near_copy_fraction", "loss_gap", "kid", "trainable_fraction"}
    assert result["full_finetune"]["trainable_fraction"] == 1.0  # every UNet parameter
    for key in ("chosen", "full_finetune"):  # placed between the base model's samples and the data
        assert math.isfinite(result[key]["domain_fidelity"])
    assert "| domain_fidelity | " in (out / "report.md").read_text()
    assert 0 <= result["chosen"]["trainable_fraction"] < 1
    from memrl.models import load_model

    assert load_model(out / "model").resolution == 8
    assert "| metric | chosen mask | full fine-tune (every parameter) |" in (out / "report.md").read_text()
    # the split is recorded, and the audit takes it: no guessed held-out images
    split = json.loads((out / "split.json").read_text())
    assert (len(split["train_digests"]), len(split["heldout_digests"])) == (96, 24)
    assert not set(split["train_digests"]) & set(split["heldout_digests"])
    common = ("memrl.audit", "--config", "test", "--from", str(out), "--samples", "8")
    audited = run(*common, "--out", str(tmp_path / "audit"))
    assert audited.returncode == 0, audited.stderr[-2000:]
    record = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert record["heldout_images"] == 24 and record["train"].endswith("split.json")
    guessed = run(*common, "--heldout", str(new_dataset), "--out", str(tmp_path / "guess"))
    assert guessed.returncode == 2 and "96 of its 120 images were fine-tuned on" in guessed.stderr
    assert "Traceback" not in guessed.stderr


def test_the_report_warns_when_the_delivered_model_did_not_learn_the_domain():
    from memrl.apply_policy import fidelity_note

    assert "may not have learned" in fidelity_note(-0.1, 0.9)  # text at 25 steps vs the mask of ones
    assert fidelity_note(0.6, 1.0) == ""  # it did learn the domain
    assert fidelity_note(0.3, 0.4) == ""  # neither did full fine-tuning: nothing to blame on the mask
    assert fidelity_note(math.nan, 0.9) == "" and fidelity_note(0.1, math.nan) == ""
    faint = fidelity_note(-0.1, 0.9, vote_range=0.2)  # the base model already draws close to the data
    assert "faint" in faint and "0.20" in faint and "may not have learned" not in faint


def test_apply_policy_sizes_the_splits_from_a_small_dataset(run_dir, tmp_path):
    """16 images (a first try with a handful of X-rays): 12 fine-tuned on, 4 held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = tmp_path / "sixteen.npz"
    np.savez(small, images=(d.images[:16] * 16).clip(0, 255).astype(np.uint8), labels=d.target[:16])
    out = tmp_path / "small"
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        str(small),
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
    result = json.loads((out / "result.json").read_text())
    assert (result["images"], result["heldout"], result["finetuned_on"]) == (16, 4, 12)
    from memrl.agents import load_policy

    assert load_policy(run_dir / "policy.zip").propose(str(small))[0].shape == (4,)  # as the CLI takes
    zero = run("memrl.apply_policy", "--policy", str(run_dir), "--data", str(small), "--steps", "0")
    assert zero.returncode == 2 and "--steps=0" in zero.stderr and "Traceback" not in zero.stderr
    np.savez(tmp_path / "seven.npz", images=np.zeros((7, 8, 8), np.uint8))
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        str(tmp_path / "seven.npz"),
        "--out",
        str(tmp_path / "seven"),
    )
    assert proc.returncode == 2 and "at least 8" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["--set", "--config"])
def test_policy_from_another_search_space_is_refused(run_dir, new_dataset, tmp_path, how):
    import yaml

    from memrl.config import load_config

    block = load_config("test", {"search.granularity": "block"}).to_dict()
    (tmp_path / "block.yaml").write_text(yaml.safe_dump(block))
    setting = ["--set", "search.granularity=block"]
    if how == "--config":
        setting = ["--config", str(tmp_path / "block.yaml")]
    proc = run(
        "memrl.apply_policy",
        "--policy",
        str(run_dir),
        "--data",
        str(new_dataset),
        "--out",
        str(tmp_path / "o"),
        *setting,
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


def test_the_shipped_policy_is_the_default_and_fits_the_default_space(tmp_path):
    from memrl.agents.policy import load_policy, shipped_policy

    from memrl.config import load_config
    from memrl.task import architecture_space, suite

    policy = load_policy(shipped_policy())  # the same safe loading: weights only, nothing unpickled
    policy.check_space(architecture_space(load_config("default")))
    bench = {e.name for e in suite(load_config("bench")) if not e.heldout}
    trained_on = {t["name"] for t in policy.card["training_tasks"]}
    assert trained_on and trained_on <= bench and policy.card["preference"]["sampling"] == "uniform"
    assert policy.card["action_mode"] == "search" and policy.card["descriptor"]["version"] == 2
    from memrl.reward import REWARD_VERSION

    # trained on reward v3, which v4 equals on every task of the table it was trained on (reference.md)
    assert (
        policy.card["reward"] == {"version": 3, "memorization": "canary_log_loss_ratio"}
        and REWARD_VERSION == 4
    )
    descriptor = np.zeros(len(policy.card["descriptor"]["fields"]), dtype=np.float32)
    masks = policy.candidates(descriptor, 4, [0.5, 0.5, 0])
    assert len({m.tobytes() for m in masks}) == 4 and all(len(m) == 7 for m in masks)
    assert "benchmark" in policy.card and "per-fold policies" in policy.card["benchmark"]["note"]
    empty = tmp_path / "empty"
    empty.mkdir()  # without --policy, apply_policy loads the shipped one, then reads the data
    proc = run("memrl.apply_policy", "--data", str(empty), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no images found" in proc.stderr, proc.stderr[-2000:]


def test_a_search_policy_of_an_older_observation_is_refused_by_name(tmp_path):
    import shutil

    from memrl.agents.policy import PolicyError, card_path, load_policy, prior_path, shipped_policy

    for source in (shipped_policy(), card_path(shipped_policy()), prior_path(shipped_policy())):
        shutil.copy(source, tmp_path / source.name)
    card = json.loads((tmp_path / "policy.card.json").read_text())
    card["observation_dim"] -= 2**7 + 1  # one candidate feature and one global fewer
    (tmp_path / "policy.card.json").write_text(json.dumps(card))
    with pytest.raises(PolicyError, match="trained with an older one.*retrain it"):
        load_policy(tmp_path / "policy.zip")


class _Payload:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(obj):
    import io
    import pickle

    buf = io.BytesIO()
    pickle.dump(obj, buf)
    return buf.getvalue()


def test_a_policy_holding_a_pickle_is_refused_without_running_it(run_dir, new_dataset, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "policy.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("policy.pth", _pickle_bytes({"weight": _Payload(marker)}))
    (tmp_path / "policy.card.json").write_text((run_dir / "policy.card.json").read_text())
    proc = run(
        "memrl.apply_policy", "--policy", str(bad), "--data", str(new_dataset), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "does not unpickle" in proc.stderr and "Traceback" not in proc.stderr
    assert "weights_only=False" not in proc.stderr and not marker.exists()


def test_a_zip_member_too_large_to_be_a_policy_is_refused_before_reading(run_dir, tmp_path):
    from memrl.agents.policy import MAX_MEMBER_BYTES, PolicyError, load_policy

    bomb = tmp_path / "policy.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("policy.pth", bytes(MAX_MEMBER_BYTES + 1))
    (tmp_path / "policy.card.json").write_text((run_dir / "policy.card.json").read_text())
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(PolicyError, match="more than a memrl policy holds"):
        load_policy(bomb)


@pytest.mark.parametrize(
    "card,message",
    [
        (b"[1, 2]", "a card is a JSON object"),
        (b'{"format": 1}', "the card lacks"),
        (b"\xff\xfe{", "not UTF-8"),
    ],
)
def test_bad_cards_are_explained(run_dir, tmp_path, card, message):
    import shutil

    shutil.copy(run_dir / "policy.zip", tmp_path / "policy.zip")
    (tmp_path / "policy.card.json").write_bytes(card)
    proc = run(
        "memrl.apply_policy", "--policy", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("observation_dim", "abc", "observation_dim='abc' is not a size"),
        ("observation_dim", -3, "observation_dim=-3 is not a size"),
        ("observation_dim", 10**9, "observation_dim=1000000000 is not a size"),
        ("net_arch", [0], "net_arch=[0] is not a list of layer widths"),
        ("observation_dim", 7, "its weights do not fit its card"),
    ],
)
def test_card_fields_are_checked_before_any_work(run_dir, tmp_path, field, value, message):
    import shutil

    shutil.copy(run_dir / "policy.zip", tmp_path / "policy.zip")
    card = json.loads((run_dir / "policy.card.json").read_text())
    card[field] = value
    (tmp_path / "policy.card.json").write_text(json.dumps(card))
    proc = run(
        "memrl.apply_policy", "--policy", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_nan_weights_and_a_huge_card_are_refused(run_dir, tmp_path):
    import io
    import shutil

    import torch
    from memrl.agents.policy import MAX_CARD_BYTES, PolicyError, load_policy

    with zipfile.ZipFile(run_dir / "policy.zip") as zf:
        state = torch.load(io.BytesIO(zf.read("policy.pth")), weights_only=True)
    buffer = io.BytesIO()
    torch.save(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
        buffer,
    )
    with zipfile.ZipFile(tmp_path / "policy.zip", "w") as zf:
        zf.writestr("policy.pth", buffer.getvalue())
    shutil.copy(run_dir / "policy.card.json", tmp_path / "policy.card.json")
    with pytest.raises(PolicyError, match="NaN or infinite weights"):
        load_policy(tmp_path / "policy.zip")
    (tmp_path / "policy.card.json").write_text(" " * (MAX_CARD_BYTES + 1))
    with pytest.raises(PolicyError, match="more than a policy card holds"):
        load_policy(tmp_path / "policy.zip")


def test_resume_never_unpickles_a_checkpoint(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(copy / "checkpoints" / "last.zip", "w") as zf:  # SB3's layout, poisoned
        zf.writestr(
            "data", json.dumps({"policy_class": {":serialized:": _pickle_bytes(_Payload(marker)).hex()}})
        )
        zf.writestr("policy.pth", _pickle_bytes(_Payload(marker)))
        zf.writestr("state.json", json.dumps({"format": 1, "num_timesteps": 4, "n_updates": 1}))
    proc = run("memrl.train_agent", "--resume", str(copy), "--set", "ppo.total_timesteps=12")
    assert proc.returncode == 2 and "does not unpickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    (copy / "checkpoints" / "last.zip").write_bytes(b"not a zip")
    proc = run("memrl.train_agent", "--resume", str(copy), "--set", "ppo.total_timesteps=12")
    assert proc.returncode == 2 and "not a memrl checkpoint" in proc.stderr


def test_bad_config_override_is_explained_and_leaves_no_run_directory(tmp_path):
    proc = run(
        "memrl.train_agent", "--config", "test", "--set", "ppo.n_stepz=3", "--run-dir", str(tmp_path / "r")
    )
    assert proc.returncode == 2 and "unknown field ppo.n_stepz" in proc.stderr
    for bad, message in (
        ("model.path=/no/such/unet", "no diffusers UNet here"),
        ("data.source=/no/such/data", "is not a bundled dataset"),
        ("finetune.steps=[1", "not valid YAML"),
    ):
        proc = train(tmp_path / "r", bad)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, bad
    assert not (tmp_path / "r").exists()


def test_a_run_whose_evaluations_all_fail_does_not_succeed(tmp_path):
    out = tmp_path / "failing"
    proc = train(out, "finetune.lr=1e30", "ppo.total_timesteps=4", "ppo.n_steps=4", "ppo.batch_size=2")
    assert proc.returncode == 2 and "evaluations failed" in proc.stderr
    assert not (out / "policy.zip").exists()
    assert json.loads((out / "run.json").read_text())["status"].startswith("failed")


def test_ctrl_c_stops_with_one_line_saying_how_to_resume(tmp_path):
    import signal

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memrl.train_agent",
            "--config",
            "test",
            "--run-dir",
            str(out),
            "--no-report",
            "--set",
            "ppo.total_timesteps=400",
            "ppo.n_steps=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background jobs with SIGINT ignored, and an ignored
        # SIGINT is inherited: give the child Python's own Ctrl-C whatever started pytest
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def child_alive() -> None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""

    wait_until((out / "episodes.jsonl").is_file, "training to begin", child_alive)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert f"--resume {out}" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


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
    from memrl.config import load_config
    from memrl.search import run_search

    cfg = load_config("test", {"env.store": str(tmp_path / "s.sqlite")})
    result = run_search(cfg, method, budget)
    assert len(result) == rows and all(r["ok"] for r in result)
    assert len({(tuple(r["mask"]), r["method"]) for r in result}) == rows  # distinct evaluations
    if method == "exhaustive":
        assert {tuple(r["mask"]) for r in result} == set(itertools.product((0, 1), repeat=4))
    if method == "fixed":
        assert {r["method"] for r in result} >= {"full", "lora", "svdiff"}
    again = run_search(cfg, method, budget)  # the same seeded search again: every evaluation stored
    assert all(r["cache_hit"] for r in again)
    assert [r["reward"] for r in again] == [r["reward"] for r in result]


def test_report_cli_writes_the_report_and_its_plots(run_dir, tmp_path):
    import shutil

    run_dir = shutil.copytree(run_dir, tmp_path / "run")  # the shared run stays as other tests see it
    for name in ("report.md", "pareto.png", "reward.png"):
        (run_dir / name).unlink(missing_ok=True)
    proc = run("memrl.report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(run_dir / "report.md")
    report = (run_dir / "report.md").read_text()
    assert "## Chosen mask" in report and "## References" in report and "![Pareto](pareto.png)" in report
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(rows) >= 3 and all(len(line.split("|")) == 9 for line in rows)
    for name in ("pareto.png", "reward.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    (tmp_path / "empty").mkdir()
    proc = run("memrl.report", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no config.yaml here" in proc.stderr


def test_a_missing_or_garbage_pipeline_folder_fails_before_any_data_is_loaded(tmp_path):
    (tmp_path / "bad" / "unet").mkdir(parents=True)
    (tmp_path / "bad" / "unet" / "config.json").write_text("{garbage")
    for path, message in (
        (tmp_path / "missing", "no diffusers UNet here"),
        (tmp_path / "bad", "is not a diffusers UNet config"),
    ):
        proc = run(
            "memrl.train_agent",
            "--config",
            "stable_diffusion",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            f"model.path={path}",
            "finetune.device=cpu",
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "r").exists()


def test_a_refused_store_leaves_no_run_directory(tmp_path):
    (tmp_path / "notes.sqlite").write_text("not a database")
    proc = train(
        tmp_path / "r", f"env.store={tmp_path / 'notes.sqlite'}", "ppo.total_timesteps=4", "ppo.n_steps=4"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "module",
    [
        "memrl.train_agent",
        "memrl.apply_policy",
        "memrl.search",
        "research.benchmark",
        "memrl.report",
        "memrl.store",
        "memrl.tables",
        "memrl.models.base",
    ],
)
def test_every_command_explains_itself(module):
    proc = run(module, "--help")
    assert proc.returncode == 0 and "usage: python -m " + module.replace(".__main__", "") in proc.stdout


@pytest.mark.parametrize("value", [-1000, 10**30, "1e30"])
def test_a_checkpoint_with_impossible_step_counts_is_refused(run_dir, tmp_path, value):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoints" / "last.zip"
    with zipfile.ZipFile(checkpoint) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    state = json.loads(members["state.json"])
    state["num_timesteps"] = value
    members["state.json"] = json.dumps(state).encode()
    with zipfile.ZipFile(checkpoint, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    proc = run("memrl.train_agent", "--resume", str(copy), "--set", "ppo.total_timesteps=12")
    assert proc.returncode == 2 and "not a memrl checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_gpu_setting_without_a_gpu_is_refused_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = train(tmp_path / "r", "finetune.device=cuda")
    assert proc.returncode == 2 and "0 CUDA device(s)" in proc.stderr and not (tmp_path / "r").exists()
