"""Evaluations on Ray: a local Ray on this machine stands in for a cluster."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from memrl.testing import run_module, wait_until

ray = pytest.importorskip("ray")

from memrl.config import load_config  # noqa: E402
from memrl.evaluator import Evaluator  # noqa: E402
from memrl.store import EvaluationStore  # noqa: E402
from memrl.task import TaskContext  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module; its address lets a subprocess join it as it would a cluster."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ray_evaluation_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"ray::_ray_evaluate" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_random_search_with_two_workers_runs_on_ray_and_matches_in_process(tmp_path):
    from memrl.search import run_search

    cfg = load_config("test", {"env.backend": "ray", "env.store": str(tmp_path / "ray.sqlite")})
    rows = run_search(cfg, "random", 2, workers=2)
    assert len(rows) == 2 and all(r["ok"] for r in rows)
    evaluated = {(0, 0, 0, 0), (1, 1, 1, 1)} | {tuple(r["mask"]) for r in rows}  # and the references
    assert len(EvaluationStore(tmp_path / "ray.sqlite")) == len(evaluated)
    local = Evaluator(EvaluationStore(tmp_path / "local.sqlite")).evaluate(
        TaskContext.get(load_config("test")).spec(rows[0]["mask"])
    )
    assert local.metrics["heldout_loss"] == pytest.approx(rows[0]["metrics"]["heldout_loss"], rel=1e-4)


def test_ppo_collects_from_envs_whose_evaluations_run_concurrently_on_ray(tmp_path, local_ray):
    out = tmp_path / "run"
    settings = [
        "env.backend=ray",
        "ppo.n_envs=2",
        "ppo.n_steps=1",
        "ppo.batch_size=2",
        "ppo.total_timesteps=4",
    ]
    proc = run_module(
        "memrl.train_agent",
        "--config",
        "test",
        "--run-dir",
        str(out),
        "--no-report",
        "--set",
        *settings,
        OMP_NUM_THREADS="1",
        RAY_ADDRESS=local_ray,  # joins the running Ray, as a run on a cluster does
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 4 and all(e["ok"] for e in episodes)  # two updates of two envs


def test_a_killed_worker_is_retried_once_then_recorded_and_the_run_goes_on(tmp_path):
    cfg = load_config("test", {"env.backend": "ray", "finetune.steps": 3000})
    evaluator = Evaluator(EvaluationStore(tmp_path / "s.sqlite"), "ray", ray=cfg.ray)
    spec = TaskContext.get(cfg).spec([1, 1, 1, 1])
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("ev", evaluator.evaluate(spec)))
    thread.start()
    kills = 0

    def kill_a_worker() -> bool:  # done after two kills, or when the evaluation ends without them
        nonlocal kills
        pids = _ray_evaluation_pids()
        if pids:
            time.sleep(1.0)  # let it start fine-tuning
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_until(lambda: not set(_ray_evaluation_pids()) & set(pids), "the killed worker to go")
        return kills == 2 or not thread.is_alive()

    wait_until(kill_a_worker, "a Ray evaluation worker to kill")  # however long workers take to start
    wait_until(lambda: not thread.is_alive(), "the evaluation to end")
    assert kills == 2
    ev = result["ev"]
    assert not ev.ok and "died 2 time(s)" in ev.error
    assert EvaluationStore(tmp_path / "s.sqlite").get(spec.hash).ok is False  # recorded
    quick = TaskContext.get(load_config("test", {"env.backend": "ray"})).spec([1, 0, 0, 0])
    assert evaluator.evaluate(quick).ok  # and the run goes on


@pytest.mark.parametrize(
    "address,message",
    [("127.0.0.1:1", "cannot reach Ray at 127.0.0.1:1 within 5 s"), ("bogus", "is not host:port")],
)
def test_an_unreachable_or_bogus_ray_address_fails_fast_in_one_line(address, message, tmp_path):
    for how in (["--set", f"ray.address={address}"], []):
        env = {"RAY_ADDRESS": address} if not how else {}
        start = time.monotonic()
        proc = run_module(
            "memrl.search",
            "--config",
            "test",
            "--method",
            "random",
            "--budget",
            "1",
            "--set",
            "env.backend=ray",
            f"env.store={tmp_path / 's.sqlite'}",
            *how[1:],
            **env,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert time.monotonic() - start < 120
