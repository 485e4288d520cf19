"""memrl.testing.run_module: a command forked from the zygote behaves as `python -m` would."""

import os

from memrl.testing import run_module

PROBE = """
import atexit, os, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))
def late():
    time.sleep(0.2)
    open("late.txt", "w").write("joined")
threading.Thread(target=late).start()
print(os.getcwd(), os.environ["PROBE_VALUE"], sys.argv[1:], __name__)
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


def test_a_forked_command_has_its_own_folder_environment_output_and_exit(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    proc = run_module("probe", "a", "--b", cwd=str(tmp_path), PROBE_VALUE="x")
    assert proc.returncode == 3 and proc.stderr == "to stderr\n"
    assert proc.stdout == f"{tmp_path} x ['a', '--b'] __main__\natexit ran\n"
    assert (tmp_path / "late.txt").read_text() == "joined"  # non-daemon threads are joined at exit
    assert "PROBE_VALUE" not in os.environ and os.getcwd() != str(tmp_path)  # this process untouched


def test_a_failing_or_missing_module_reports_as_python_does(tmp_path):
    (tmp_path / "broken.py").write_text("raise ValueError('bad input')\n")
    proc = run_module("broken", cwd=str(tmp_path))
    assert proc.returncode == 1 and "ValueError: bad input" in proc.stderr
    proc = run_module("memrl.no_such_module")
    assert proc.returncode == 1 and "No module named memrl.no_such_module" in proc.stderr


def test_a_changed_import_time_variable_gets_a_fresh_interpreter(tmp_path):
    probe = "import os, sys; print(os.environ['OMP_NUM_THREADS'], 'torch' in sys.modules)"
    (tmp_path / "threads.py").write_text(probe)
    other = "3" if os.environ.get("OMP_NUM_THREADS") != "3" else "4"
    proc = run_module("threads", cwd=str(tmp_path), OMP_NUM_THREADS=other)
    assert proc.returncode == 0 and proc.stdout.split() == [other, "False"]  # nothing preloaded
    proc = run_module("threads", cwd=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.split()[1] == "True"  # forked: torch already loaded
