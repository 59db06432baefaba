"""Helpers of tests that run child processes: the repository root, a child run with one thread, benchmark scripts."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_child(args, timeout=300, check=True):
    """Runs ``args`` from the repository root with one OpenMP thread per process (2-core machines)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))  # scripts under tests/ import this checkout's bbm, not an installed one
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
