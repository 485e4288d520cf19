import numpy as np
import pytest

from memrl.config import ConfigError, config_names, load_config, parse_overrides


def test_shipped_configs_resolve_by_name():
    assert {"default", "test"} <= set(config_names())
    assert load_config("test").data.resolution == 8
    assert load_config("default").data.resolution == 16


def test_dotted_overrides_and_cli_strings():
    cfg = load_config("test", ["finetune.steps=7", "search.method=lora", "data.private_classes=[1, 2]"])
    assert cfg.finetune.steps == 7
    assert cfg.search.method == "lora"
    assert cfg.data.private_classes == [1, 2]
    assert parse_overrides(["a.b=0.5"]) == {"a.b": 0.5}


def test_unknown_field_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown field finetune\.stepz.*valid fields.*steps"):
        load_config("test", {"finetune.stepz": 3})


def test_bad_choice_and_type_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"search\.method='sparse' is not one of"):
        load_config("test", {"search.method": "sparse"})
    with pytest.raises(ConfigError, match=r"finetune\.lr: expected float"):
        load_config("test", {"finetune.lr": "fast"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  canaries: 999\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: data\.canaries=999"):
        load_config(bad)


def test_missing_config_names_the_choices():
    with pytest.raises(ConfigError, match="neither a file nor a shipped config name"):
        load_config("nope")


def test_hash_changes_with_any_field():
    a, b = load_config("test"), load_config("test", {"finetune.seed": 1})
    assert a.hash() != b.hash() and a.hash() == load_config("test").hash()


def test_atomic_writes_keep_old_content_on_failure_and_normal_permissions(tmp_path):
    from memrl.utils import atomic_path, atomic_write_text

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    assert target.stat().st_mode & 0o644 == 0o644
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize(
    "override,message",
    [
        ({"finetune.lr": "nan"}, r"finetune\.lr='nan': must be a finite number"),
        ({"finetune.lr": float("inf")}, "must be a finite number"),
        ({"finetune.lr": 0}, r"finetune\.lr=0\.0 must be positive"),
        ({"ppo.total_timesteps": -5}, r"ppo\.total_timesteps=-5 must be positive"),
        (
            {"ppo.total_timesteps": 0},
            r"ppo\.total_timesteps=0 must be positive \(0 only with env.mode=search",
        ),
        ({"ppo.n_envs": 0}, r"ppo\.n_envs=0 must be positive"),
        ({"ppo.n_epochs": -1}, r"ppo\.n_epochs=-1 must be positive"),
        ({"ppo.batch_size": 0}, r"ppo\.batch_size=0 must be positive"),
        ({"ppo.batch_size": 64}, r"ppo\.batch_size=64 must be between 2 and ppo\.n_steps"),
        ({"finetune.steps": True}, r"finetune\.steps: expected int"),
        ({"env.tasks": [{"sede": 1}]}, r"env\.tasks\[0\]: unknown key 'sede'"),
        ({"env.tasks": [{"name": "a"}, {"name": "a"}]}, "task names must be unique"),
        ({"env.tasks": [{"name": "a", "noise_masks": -1}]}, r"noise_masks=-1 must be a whole number"),
        ({"ppo.net_arch": [0]}, r"ppo\.net_arch=\[0\] must list one or more positive layer widths"),
        ({"ppo.net_arch": [-5]}, r"ppo\.net_arch=\[-5\]"),
        ({"env.max_groups": 0}, r"env\.max_groups=0 must be 1 or more"),
        ({"env.max_groups": -1}, r"env\.max_groups=-1 must be 1 or more"),
        ({"seed": -1}, r"seed=-1 must be in \[0, 2\*\*32\)"),
        ({"finetune.steps": 10**22}, r"finetune\.steps=10000000000000000000000 is more than memrl runs"),
        ({"finetune.checkpoint_every": 2}, r"finetune\.checkpoint_every=2 must be a positive divisor"),
        ({"metrics.extraction_quantile": 0.7}, r"metrics\.extraction_quantile=0\.7 must be in \[0, 0\.5\]"),
        ({"model.block_out_channels": [7, 13]}, r"model\.block_out_channels=\[7, 13\]: every width"),
        ({"model.attention_head_dim": 0}, r"model\.attention_head_dim.*must be positive"),
        ({"finetune.batch_size": 100000}, r"finetune\.batch_size=100000 must be between 1 and 4096"),
        ({"sample.num_samples": 1}, r"sample\.num_samples=1 must be 2 or more"),
        ({"data.heldout_size": 1}, r"data\.heldout_size=1 must be 4 or more"),
        ({"reward.quality": "nope"}, r"reward\.quality='nope' is not a metric; choose one of heldout_loss"),
        ({"reward.memorization": "kid2"}, r"reward\.memorization='kid2' is not a metric"),
        ({"reward.noise_span": -1}, r"reward\.noise_span=-1\.0 must be >= 0"),
        (
            {"finetune.cuda_graph": True, "finetune.gradient_checkpointing": True},
            "cannot both be on",
        ),
    ],
)
def test_every_bad_value_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("test", override)


def test_yaml_no_is_the_mixed_precision_setting_no():
    assert load_config("test", ["finetune.mixed_precision=no"]).finetune.mixed_precision == "no"


def test_a_yaml_alias_bomb_and_a_huge_file_are_refused_before_expanding(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: the YAML uses an alias \(\*a\)"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="uses an alias"):
        parse_overrides(["data.seed=&x 3", "data.private_size=*x"])
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match="larger than 1,000,000 bytes"):
        load_config(huge)


def test_overrides_given_as_a_string_are_explained():
    with pytest.raises(ConfigError, match=r"pass a dict .* or a list of 'key=value' strings"):
        load_config("test", "finetune.steps=3")  # type: ignore[arg-type]


def test_load_config_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from memrl.config import load_config; load_config('test'); print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def test_reward_metric_names_are_the_metrics_an_evaluation_measures(tmp_path):
    import gymnasium as gym

    import memrl  # noqa: F401
    from memrl.registry import METRICS

    env = gym.make("MemControl-v0", config="test", overrides={"env.store": str(tmp_path / "s.sqlite")})
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.ones(env.action_space.shape, dtype=np.int8))
    assert set(info["metrics"]) == set(METRICS)


def test_choices_come_from_the_modules_that_own_them():
    from memrl.backends import BACKENDS
    from memrl.peft_methods import METHODS

    for method in METHODS:
        assert load_config("test", {"search.method": method}).search.method == method
    for backend in BACKENDS:
        assert load_config("test", {"env.backend": backend}).env.backend == backend


def test_unparseable_overrides_and_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'finetune\.steps=\[1': the value is not valid YAML"):
        parse_overrides(["finetune.steps=[1"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# caf\u00e9\ndata:\n  seed: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        load_config(listy)


def test_task_entries_carry_a_name_and_heldout_flag():
    from memrl.task import suite

    entries = suite(load_config("bench"))
    assert len(entries) >= 8 and sum(e.heldout for e in entries) >= 2
    assert len({e.cfg.data.source for e in entries}) >= 4
    faces = next(e for e in entries if e.name == "faces")
    assert faces.cfg.data.source == "faces" and faces.cfg.data.private_size == 48


def test_a_section_repeated_in_a_yaml_file_is_refused(tmp_path):
    """YAML keeps the second of two equal keys, silently dropping the first's fields."""
    path = tmp_path / "twice.yaml"
    path.write_text("finetune:\n  steps: 3\ndata:\n  seed: 1\nfinetune:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"the key 'finetune' appears twice \(lines 1 and 5\)"):
        load_config(path)


def test_a_folder_held_by_a_live_process_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import subprocess

    from memrl.errors import MemrlError
    from memrl.utils import folder_lock

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / ".memrl-lock").write_text(str(sleeper.pid))
        with pytest.raises(
            MemrlError, match=f"being written by another memrl process \\(pid {sleeper.pid}\\)"
        ):
            with folder_lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with folder_lock(tmp_path):  # its process is gone: the lock is stale
        assert (tmp_path / ".memrl-lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".memrl-lock").exists()
