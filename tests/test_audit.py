"""python -m memrl.audit end to end: a model fine-tuned on a few heavily duplicated images against
its base model, and the inputs it refuses."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import memrl
from memrl.config import load_config
from memrl.testing import run_module as run


def to_npz(path, images, labels):
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()[:, 0]
    np.savez(path, images=u8, labels=labels.numpy())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The test config's base model, and a copy fine-tuned (every parameter) on 4 images, each
    duplicated 16 times; the 4 images and 32 held-out ones of the same source as .npz files."""
    from memrl.data import ImageSet
    from memrl.finetune import finetune
    from memrl.task import TaskContext

    folder = tmp_path_factory.mktemp("audit")
    cfg = load_config("test", {"finetune.steps": 150, "finetune.lr": 3e-3, "search.granularity": "block"})
    ctx = TaskContext.get(cfg)
    private, heldout = ctx.splits.private, ctx.splits.heldout
    train = private.subset(list(range(4)))
    repeated = ImageSet(train.images.repeat(16, 1, 1, 1), train.labels.repeat(16), None, "dup")
    model, _ = finetune(ctx.base, repeated, ctx.space.prefixes(np.ones(ctx.space.k, dtype=np.int8)), cfg)
    model.save(folder / "model")
    ctx.base.save(folder / "base")
    to_npz(folder / "train.npz", train.images, train.labels)
    to_npz(folder / "heldout.npz", heldout.images, heldout.labels)
    # the positive control: every parameter fine-tuned on the private set, its 2 canaries x 16
    dup = dataclasses.replace(ctx.splits, duplication=16).finetune_set()
    private_model, _ = finetune(ctx.base, dup, ctx.space.prefixes(np.ones(ctx.space.k, dtype=np.int8)), cfg)
    private_model.save(folder / "private")
    to_npz(folder / "private.npz", private.images, private.labels)
    to_npz(folder / "canaries.npz", ctx.splits.canaries.images, ctx.splits.canaries.labels)
    return folder


def audit(folder, model, out, *extra):
    return run(
        "memrl.audit",
        "--config",
        "test",
        "--model",
        str(folder / model),
        "--train",
        str(folder / "train.npz"),
        "--heldout",
        str(folder / "heldout.npz"),
        "--out",
        str(out),
        "--samples",
        "16",
        *extra,
    )


def test_the_audit_ranks_the_memorized_model_above_its_base_and_gates_it(models, tmp_path):
    proc = audit(
        models, "model", tmp_path / "a", "--reference", str(models / "base"), "--fail-above", "mia_auc=0.8"
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "gate failed: mia_auc" in proc.stderr and "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    tuned, base = result["results"]["model"], result["results"]["reference"]
    assert tuned["mia_auc"] > 0.8 > base["mia_auc"] and tuned["loss_gap"] > base["loss_gap"]
    # calibrated against the reference's loss on each image; the reference against itself is not shown
    assert tuned["mia_auc_calibrated"] > 0.8 and tuned["mia_tpr_calibrated"] > 0
    assert base["mia_auc_calibrated"] != base["mia_auc_calibrated"]  # NaN
    own = np.log(np.array(tuned["per_image"]["loss"]) / np.array(base["per_image"]["loss"]))
    assert np.allclose(tuned["per_image"]["calibrated_loss"], own)
    assert len(tuned["per_image"]["loss"]) == 4 and result["fingerprints"]["train"]
    assert tuned["noise_norm"] > 0 and len(tuned["per_image"]["noise_norm"]) == 4
    # domain fidelity is measured against the reference's samples: none for the reference itself
    assert np.isfinite(tuned["domain_fidelity"]) and base["domain_fidelity"] != base["domain_fidelity"]
    assert f"domain fidelity {tuned['domain_fidelity']:.2f}" in proc.stdout
    rows = (tmp_path / "a" / "exposure.csv").read_text().splitlines()
    assert rows[0].startswith("rank,file,train_index") and len(rows) == 5
    for name in ("membership.png", "copies.png"):
        assert (tmp_path / "a" / name).read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "a" / "report.md").read_text()
    assert "**FAILED**" in report and "| mia_auc_calibrated | " in report and "| domain_fidelity | " in report
    passed = audit(models, "base", tmp_path / "b", "--fail-above", "mia_auc=0.8")
    assert passed.returncode == 0, passed.stderr[-2000:]
    import shutil

    results = models / "applied"  # an apply_policy results folder names its delivered model/
    shutil.copytree(models / "model", results / "model", dirs_exist_ok=True)
    (results / "result.json").write_text("{}")
    again = audit(models, "applied", tmp_path / "c")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        json.loads((tmp_path / "c" / "audit.json").read_text())["results"]["model"]["mia_auc"]
        == tuned["mia_auc"]
    )


def test_bad_inputs_are_refused_in_one_line(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    nan_model = tmp_path / "nan"
    shutil.copytree(models / "model", nan_model)
    weights_file = nan_model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    for tensor in weights.values():
        tensor.fill_(float("nan"))
    save_file(weights, weights_file)
    few = tmp_path / "few.npz"
    np.savez(few, images=np.load(models / "heldout.npz")["images"][:8])
    cases = [
        (["--heldout", str(models / "train.npz")], "shares 4 of its 4 images with --train"),
        (["--heldout", str(few)], "needs at least 20 held-out images"),
        (["--model", str(tmp_path)], "no diffusers UNet here"),
        (["--train", str(tmp_path / "nowhere")], "--train:"),
        (["--fail-above", "mia=3"], "write METRIC=NUMBER"),
        (["--fail-above", "mia_auc_calibrated=0.6"], "mia_auc_calibrated needs --reference"),
        (["--set", "data.resolution=16"], "pass --set data.resolution=8"),
        (["--fail-above", "mia_auc=0.6", "mia_auc=0.7"], "names mia_auc twice"),
        (["--out", str(models / "train.npz")], "exists and is not a folder"),
        (["--out", str(Path(memrl.__file__).parent / "assets" / "policy")], "inside the installed memrl"),
        (["--model", str(nan_model)], "holds NaN or infinite values"),
        (["--from", str(tmp_path)], "no split.json here"),
    ]
    for extra, message in cases:
        proc = audit(models, "model", tmp_path / "o", *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (
            extra,
            proc.stderr,
        )


def test_a_tiny_stable_diffusion_pipeline_and_a_lora_adapter_on_it_are_audited(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from sklearn.datasets import load_digits

    from memrl.models.stable_diffusion import build_random_pipeline, load_components

    pipeline = build_random_pipeline(tmp_path / "sd")
    unet = load_components(str(pipeline.resolve())).unet
    lora = get_peft_model(
        __import__("copy").deepcopy(unet),
        LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    digits = load_digits()
    rgb = np.repeat((digits.images * 16).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    np.savez(tmp_path / "train.npz", images=rgb[:8], labels=digits.target[:8])
    np.savez(tmp_path / "heldout.npz", images=rgb[8:40], labels=digits.target[8:40])
    common = [
        "--config",
        "test",
        "--train",
        str(tmp_path / "train.npz"),
        "--heldout",
        str(tmp_path / "heldout.npz"),
        "--samples",
        "4",
        "--set",
        "data.resolution=16",
        "data.channels=3",
        "data.base_size=16",
    ]
    proc = run("memrl.audit", "--model", str(pipeline), "--out", str(tmp_path / "a"), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "a" / "audit.json").read_text())["results"]["model"]
    assert 0 <= result["mia_auc"] <= 1 and len(result["per_image"]["loss"]) == 8
    proc = run(
        "memrl.audit",
        "--model",
        str(tmp_path / "adapter"),
        "--base",
        str(pipeline),
        "--reference",
        str(pipeline),
        "--out",
        str(tmp_path / "b"),
        *common,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = json.loads((tmp_path / "b" / "audit.json").read_text())["results"]
    assert both["model"]["per_image"]["loss"] != both["reference"]["per_image"]["loss"]  # the adapter acts
    assert torch.equal(unet.conv_in.weight, load_components(str(pipeline.resolve())).unet.conv_in.weight)
    proc = run("memrl.audit", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "c"), *common)
    assert (
        proc.returncode == 2 and "name the Stable Diffusion pipeline folder it was trained on" in proc.stderr
    )


def test_controls_fire_when_they_should_and_only_then(models, tmp_path):
    """Positive control: a model fine-tuned on a private set whose canaries repeat fails a
    worst-case gate on its canaries and on its whole private set, and an average-case gate that
    lets the private set through says why. Negative controls: the base model, and a model
    fine-tuned on other images, audited on two halves of images neither saw, pass."""
    half = models / "unseen"
    held = np.load(models / "heldout.npz")
    np.savez(half.with_suffix(".a.npz"), images=held["images"][:16], labels=held["labels"][:16])
    np.savez(half.with_suffix(".b.npz"), images=held["images"][16:], labels=held["labels"][16:])

    def run_audit(model, train, heldout, out, *gates):
        return run(
            "memrl.audit",
            "--config",
            "test",
            "--model",
            str(models / model),
            "--train",
            str(train),
            "--heldout",
            str(heldout),
            "--out",
            str(tmp_path / out),
            "--samples",
            "16",
            "--fpr",
            "0.0625",
            "--fail-above",
            *gates,
        )

    worst = ("mia_tpr=0.2", "extracted=0")
    canaries = run_audit("private", models / "canaries.npz", models / "heldout.npz", "pos1", *worst)
    assert canaries.returncode == 1 and "gate failed: mia_tpr" in canaries.stderr, canaries.stderr[-1500:]
    private = run_audit("private", models / "private.npz", models / "heldout.npz", "pos2", "mia_tpr=0.1")
    assert private.returncode == 1 and "gate failed: mia_tpr" in private.stderr, private.stderr[-1500:]
    average = run_audit("private", models / "private.npz", models / "heldout.npz", "pos3", "mia_auc=0.95")
    if average.returncode == 0:  # the AUC averages the canaries away: the pass must say so
        assert "passed on average-case figures only" in average.stdout
    for model in ("base", "private"):  # neither saw the held-out images
        proc = run_audit(
            model, half.with_suffix(".a.npz"), half.with_suffix(".b.npz"), f"neg-{model}", "mia_tpr=0.5"
        )
        assert proc.returncode == 0, (model, proc.stderr[-1500:])
        result = json.loads((tmp_path / f"neg-{model}" / "audit.json").read_text())["results"]["model"]
        lo, hi = result["mia_auc_ci"]
        assert lo <= 0.5 <= hi, (model, result["mia_auc"], lo, hi)
    first = (tmp_path / "pos1" / "report.md").read_text().split("## Every figure")[0]
    assert "## Worst case first" in first and "TPR at 0.0625 FPR" in first and "strongest attack" in first
