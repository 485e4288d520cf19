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
