"""Helpers of tests that run child processes: the repository root, a child run with one thread, a test module run
as a script that reports its findings, benchmark scripts."""
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATHS = os.pathsep.join([str(REPO), str(REPO / "tests")])  # this checkout's bbm (not an installed one), the helpers


def run_child(args, timeout=300, check=True):
    """Runs ``args`` from the repository root with one OpenMP thread per process (2-core machines)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=PATHS)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def python(*args):
    return [sys.executable, *map(str, args)]


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its siblings importable as it imports them)."""
    import importlib

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def findings_of(script, work: Path, timeout: int = 600, **env) -> dict:
    """Runs the test module ``script`` as a child process (``python script WORK``, its ``__main__`` calling
    ``report_findings``) and returns what it found; a crash in it fails the calling test with its traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=PATHS, **env)
    proc = subprocess.run([sys.executable, str(script), str(work)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((Path(work) / "results.json").read_text())


def report_findings(find):
    """The ``__main__`` of a module that ``findings_of`` runs: ``find(WORK)``'s dict (or the crash) to WORK/results.json."""
    work = Path(sys.argv[1])
    try:
        found = find(work)
    except Exception:  # reported to the tests, which fail with it
        found = {"crash": traceback.format_exc()}
    (work / "results.json").write_text(json.dumps(found, default=str))
