"""Stopping by signal: the exit codes, repeated SIGTERMs, a second SIGINT, and a step that never ends."""
import signal
import subprocess
import sys
from pathlib import Path

from bbm.train.stop import exit_code

MODULE = Path(__file__).resolve().parents[3] / "bbm" / "train" / "stop.py"
SCRIPT = f"""
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("stop", {str(MODULE)!r})
stop_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stop_module)
stop = stop_module.StopSignal(min_grace_s=0.5)
stop.install()
mode = sys.argv[1]
if mode == "hung":  # SIGTERM twice, then a step that never ends
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    print("stopping on", stop.signum, flush=True)
    time.sleep(120)
elif mode == "boundary":  # the loop reaches a step boundary: the grace period no longer applies
    os.kill(os.getpid(), signal.SIGTERM)
    stop.at_boundary()
    time.sleep(1.5)
    print("saved and exited", flush=True)
elif mode == "twice":  # Ctrl-C twice
    os.kill(os.getpid(), signal.SIGINT)
    print("stopping on", stop.signum, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(120)
"""


def run(mode):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)


def test_exit_codes():
    assert (exit_code(signal.SIGTERM), exit_code(signal.SIGINT), exit_code(None)) == (143, 130, 0)


def test_a_step_that_never_ends_still_exits_after_the_grace_period():
    proc = run("hung")
    assert proc.returncode == 143 and proc.stdout == "stopping on 15\n"  # the second SIGTERM changed nothing
    assert proc.stderr == ("bbm train: signal 15: no step boundary within 0.5 s; exiting without saving (the last "
                           "checkpoint is kept), exit code 143\n")


def test_grace_period_ends_at_the_step_boundary():
    proc = run("boundary")
    assert proc.returncode == 0 and proc.stdout == "saved and exited\n", proc.stderr


def test_second_sigint_interrupts_at_once():
    proc = run("twice")
    assert proc.stdout == "stopping on 2\n" and "KeyboardInterrupt" in proc.stderr
    assert proc.returncode == -signal.SIGINT  # an uncaught KeyboardInterrupt ends Python by SIGINT
