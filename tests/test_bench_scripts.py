"""Every script under bench/ and every module of research/ imports (a moved or renamed function breaks it
here, not a month later), and the installed package never imports the research harness."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: main() is not run
    assert callable(getattr(module, "main", None)), f"{script} has no main()"


RESEARCH = Path(__file__).resolve().parents[1] / "research"


MODULES = [".".join(p.relative_to(RESEARCH.parent).with_suffix("").parts) for p in RESEARCH.rglob("*.py")]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_a_research_module_imports(module):
    importlib.import_module(module)


def test_the_installed_package_never_imports_the_research_harness():
    import subprocess
    import sys

    code = (
        "import sys, memrl, memrl.search, memrl.apply_policy, memrl.train_agent, memrl.audit, memrl.tables, "
        "memrl.searchers, memrl.agents, memrl.envs; print(any(m.startswith('research') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


def test_the_release_command_checks_its_inputs_before_any_training(tmp_path):
    from research.release import main

    assert main(["--config", "test", "--results", str(tmp_path), "--to", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


def test_the_world_acceptance_measures_domain_fidelity_at_every_checkpoint():
    """bench/world.py's records carry each checkpoint's domain fidelity against the base model's
    own samples, and the report reads it (``-``-free) where it is there and says n/a where not."""
    spec = importlib.util.spec_from_file_location("bench_world", BENCH / "world.py")
    world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world)
    record, sheets = world.measure_task("test", "test", heldout=False, steps=50)
    assert [c["step"] for c in record["curve"]] == [25, 50] and set(sheets) == {"base", 25, 50}
    fidelity = [c["domain_fidelity"] for c in record["curve"]]
    assert all(-2 < f < 3 for f in fidelity), fidelity  # finite, on the 0 (base) to 1 (data) scale
    assert world.fidelity_cells(record) == f"{fidelity[0]:.2f} / n/a / n/a"
    assert world.learns_domain(record) == (max(fidelity) >= world.LEARNS_DOMAIN)
    old = {"curve": [{"step": 25}]}  # a record from before the figure
    assert world.fidelity_cells(old) == "n/a / n/a / n/a" and not world.learns_domain(old)


def test_the_world_vote_says_how_well_domain_fidelity_tells_base_samples_from_data(tmp_path, monkeypatch):
    """``bench/world.py vote``: per source, the vote's floor and ceiling on the same base samples
    as ``run`` and further draws of the base model, whose fidelity is the figure's noise."""
    import argparse
    import json

    spec = importlib.util.spec_from_file_location("bench_world", BENCH / "world.py")
    world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world)
    monkeypatch.setattr(world, "VOTE", tmp_path / "vote.json")
    assert world.vote(argparse.Namespace(config="test")) == 0
    sources = json.loads((tmp_path / "vote.json").read_text())["sources"]
    assert sources
    for v in sources.values():
        assert 0 <= v["floor"] <= 1 and 0 <= v["ceiling"] <= 1
        assert v["range"] == v["ceiling"] - v["floor"]
        assert len(v["redraws"]) == world.REDRAWS and all(-5 < f < 5 for f in v["redraws"])
