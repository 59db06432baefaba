"""One run per run directory: rank 0 holds an exclusive ``flock`` on ``<run dir>/run.lock`` for the run's life.

The kernel drops the lock when the holder exits, however it exits (a crash or kill -9 included), so a lock is
never left behind by a dead run; the file keeps the holder's pid, host and start time, which a second run
names when it refuses to start. A holder that ended without releasing (it was killed) left its line in the
file: the next run takes over, saying so."""
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        holder = {"pid": "?", "host": f"? (unreadable lock file: {text[:40]!r})"}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """``RunLock(run_dir)`` takes the lock or raises RuntimeError naming the holder; ``release()`` gives it back."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(self.fd)
            os.close(self.fd)
            self.fd = None
            raise RuntimeError(f"run.dir: expected a run directory no other run is using, got {self.path.parent} "
                               f"in use by {_describe(holder)} (lock {self.path})") from None
        previous = _read(self.fd)
        self.taken_over = _describe(previous) if previous else None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": time.time()}).encode(), 0)
        os.fsync(self.fd)

    def release(self):
        """Empties the file (a clean end) and unlocks; safe to call twice."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
