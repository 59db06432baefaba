"""Stopping a run by signal: SIGTERM or SIGINT asks the training loop to save and exit at the next step boundary.

* The run's exit code after a stop is ``exit_code(signum)``: 128 + the signal number (143 for SIGTERM, 130 for
  SIGINT), the shell's convention for a process ended by that signal, so a scheduler tells a stopped run from a
  finished one (0) and from a crash (1).
* Repeated SIGTERMs (launchers and schedulers often send several) change nothing; a second SIGINT (Ctrl-C twice)
  interrupts at once.
* A step that does not end within the grace period after the signal (a hung collective, a step far too large
  for the machine) ends the process without saving, with the same exit code: the last checkpoint stays as it
  was. The grace period is ``max(min_grace_s, 3 x the longest step so far)``.
"""
import os
import signal
import sys
import threading

MIN_GRACE_S = 60.0


def exit_code(signum) -> int:
    """The exit code of a run stopped by ``signum`` (0 for a run that was not stopped)."""
    return 128 + int(signum) if signum else 0


class StopSignal:
    """``install()`` in the main thread; the loop reads ``signum``, reports each step's wall time with
    ``step_took()`` and calls ``at_boundary()`` once it has stopped stepping; ``restore()`` at the end."""

    def __init__(self, min_grace_s: float = MIN_GRACE_S, say=None):
        self.signum = None
        self.previous = {}
        self.min_grace_s = min_grace_s
        self.longest_step_s = 0.0
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.watchdog = None
        self.stepping = True

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if self.stepping and self.watchdog is None:
            self.watchdog = threading.Timer(self.grace_s(), self._give_up)
            self.watchdog.daemon = True
            self.watchdog.start()
        if signum == signal.SIGINT:  # a second Ctrl-C gets the previous handler (KeyboardInterrupt)
            signal.signal(signum, self.previous[signum])

    def grace_s(self) -> float:
        return max(self.min_grace_s, 3 * self.longest_step_s)

    def step_took(self, seconds: float):
        self.longest_step_s = max(self.longest_step_s, seconds)

    def at_boundary(self):
        """The loop stopped stepping: the save and the summary are not subject to the grace period."""
        self.stepping = False
        if self.watchdog is not None:
            self.watchdog.cancel()

    def _give_up(self):
        self.say(f"bbm train: signal {self.signum}: no step boundary within {self.grace_s():g} s; exiting without "
                 f"saving (the last checkpoint is kept), exit code {exit_code(self.signum)}")
        os._exit(exit_code(self.signum))

    def restore(self):
        self.at_boundary()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
