"""One run per run directory: a second one is refused naming the holder; a killed holder's lock is taken over."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bbm.train.run_lock import RunLock

MODULE = Path(__file__).resolve().parents[3] / "bbm" / "train" / "run_lock.py"
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", {str(MODULE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lock = module.RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_second_lock_is_refused_and_release_frees_it(tmp_path):
    first = RunLock(tmp_path)
    with pytest.raises(RuntimeError) as error:
        RunLock(tmp_path)
    assert str(error.value).startswith(f"run.dir: expected a run directory no other run is using, got {tmp_path} in "
                                       f"use by pid {os.getpid()} on host {socket.gethostname()}, started ")
    first.release()
    first.release()
    again = RunLock(tmp_path)
    assert again.taken_over is None  # released cleanly: nothing to take over
    again.release()


def test_other_process_holds_it_until_killed_then_it_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"in use by pid {holder.pid} on host "):
            RunLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)  # the kernel dropped the dead holder's lock
    assert lock.taken_over.startswith(f"pid {holder.pid} on host {socket.gethostname()}, started ")
    lock.release()
