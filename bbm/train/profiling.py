"""``metrics.profile_steps: [first, last]``: those optimizer steps run under torch.profiler and leave, in
``<run dir>/profile``, a Chrome trace (chrome://tracing, Perfetto) and a table of the operators by device time
(or CPU time without a GPU), one of each per rank. Profiled steps run slower: their throughput is not the
run's."""
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bbm._files import write_atomic


class StepProfiler:
    def __init__(self, steps, run_dir, rank: int, device):
        self.first, self.last = steps if steps else (None, None)
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.active = None

    def before_step(self, step: int):
        """Called before optimizer step ``step`` (1-based) runs."""
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities, record_shapes=True)
            self.active.__enter__()

    def after_step(self, step: int):
        """Called after step ``step``: the last profiled one writes the trace and the table."""
        if self.active is None or step != self.last:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof, self.active = self.active, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        partial = trace.with_name(f".{trace.name}.tmp.{os.getpid()}")
        prof.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
        write_atomic(self.dir / f"ops_rank{self.rank}.txt",
                     f"steps {self.first}-{self.last}, sorted by {sort}\n{table}\n")

    def close(self):
        """Stops a profile the run left before its last step (nothing is written)."""
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None
