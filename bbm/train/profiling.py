"""``metrics.profile_steps: [first, last]``: those optimizer steps run under torch.profiler and leave, in
``<run dir>/profile``, a Chrome trace (chrome://tracing, Perfetto) and a table of the operators by device time
(or CPU time without a GPU), one of each per rank. On a GPU the table starts with the step's kernel time by
kind (attention, matmuls, optimizer, ...), how much of the steps' wall time the GPU was busy (the rest it
waited for the host), and per phase of the step (batch, forward, backward, optimizer) the host's time and the
GPU's idle time meanwhile. Profiled steps run slower: their throughput is not the run's."""
import json
import os
import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bbm._files import temp_path, write_atomic

# Kernel kinds by name (PyTorch, cuBLAS, cuDNN, Triton, Inductor, NCCL); the first match wins.
KINDS = (("attention", r"fwd_kernel|bwd_kernel|attn|attention|flash|fmha|sdpa|cudnn|triton_tem"),
         ("matmul", r"gemm|nvjet|cutlass|xmma|gemv"),
         ("optimizer", r"adam|multi_tensor"),
         ("communication", r"nccl"),
         ("copies", r"memcpy|memset"))
OTHER = "element-wise and other"
GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # Chrome-trace categories of work on the GPU


def kernel_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return OTHER


def kernel_breakdown(kernels, steps: int) -> str:
    """Lines of GPU time per step by kernel kind, from (kernel name, total microseconds) pairs."""
    totals = {}
    for name, us in kernels:
        kind = kernel_kind(name)
        totals[kind] = totals.get(kind, 0.0) + us
    busy = sum(totals.values()) or 1.0
    lines = [f"GPU kernel time per step: {busy / steps / 1e3:.1f} ms"]
    lines += [f"  {kind:<24} {us / steps / 1e3:9.1f} ms  {100 * us / busy:5.1f}%"
              for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def busy_spans(trace_events) -> list:
    """The disjoint (start, end) stretches during which at least one kernel, copy or memset ran, from a Chrome
    trace's events (overlapping ones, e.g. on several streams, merged)."""
    merged = []
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in trace_events
                             if e.get("cat") in GPU_EVENTS and "dur" in e):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def gpu_busy_us(trace_events) -> float:
    """Microseconds during which the GPU ran something (see ``busy_spans``)."""
    return sum(end - start for start, end in busy_spans(trace_events))


def phase_lines(trace_events, steps: int) -> str:
    """Per step: the host's wall time in each phase of the training step (the trainer's ``bbm.*`` annotations)
    and how long the GPU sat idle meanwhile, i.e. waited for that phase's host work."""
    spans = busy_spans(trace_events)
    phases = {}
    for e in trace_events:
        if e.get("cat") == "user_annotation" and e.get("name", "").startswith("bbm.") and "dur" in e:
            start, end = e["ts"], e["ts"] + e["dur"]
            busy = sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans if a < end and b > start)
            wall, idle = phases.get(e["name"], (0.0, 0.0))
            phases[e["name"]] = (wall + e["dur"], idle + e["dur"] - busy)
    return "\n".join(f"  {name[4:]:<24} host {wall / steps / 1e3:7.1f} ms, GPU idle {idle / steps / 1e3:6.1f} ms"
                     for name, (wall, idle) in phases.items())


def busy_line(busy_us: float, wall_us: float, steps: int) -> str:
    return (f"GPU busy {busy_us / steps / 1e3:.1f} ms of {wall_us / steps / 1e3:.1f} ms wall per step "
            f"({100 * busy_us / wall_us:.1f}%; the rest it waited for the host)")


def gpu_summary(trace_events, wall_us: float, steps: int) -> str:
    """The profile table's head on a GPU: kernel time by kind, busy time, and the phases' idle time, per step.
    Kernels come from the trace's GPU events (the operator table also lists each compiled graph with the time
    of its kernels, which would count them twice)."""
    kernels = [(e["name"], e["dur"]) for e in trace_events if e.get("cat") in GPU_EVENTS and "dur" in e]
    return (kernel_breakdown(kernels, steps) + "\n" + busy_line(gpu_busy_us(trace_events), wall_us, steps) + "\n"
            + "per step phase (host wall time, and the GPU's idle time meanwhile):\n"
            + phase_lines(trace_events, steps) + "\n")


class StepProfiler:
    def __init__(self, steps, run_dir, rank: int, device):
        self.first, self.last = steps if steps else (None, None)
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.active = None
        self.started = None  # perf_counter() when the first profiled step began

    def before_step(self, step: int):
        """Called before optimizer step ``step`` (1-based) runs."""
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities, record_shapes=True)
            self.active.start()
            self.started = time.perf_counter()

    def after_step(self, step: int):
        """Called after step ``step``: the last profiled one writes the trace and the table."""
        if self.active is None or step != self.last:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self.started) * 1e6
        prof, self.active = self.active, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        partial = temp_path(trace)
        prof.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        head = f"steps {self.first}-{self.last}, sorted by {sort}\n"
        if self.cuda:
            steps = self.last - self.first + 1
            head += gpu_summary(json.loads(trace.read_text())["traceEvents"], wall_us, steps)
        table = averages.table(sort_by=sort, row_limit=40, max_name_column_width=70)
        write_atomic(self.dir / f"ops_rank{self.rank}.txt", f"{head}{table}\n")

    def close(self):
        """Stops a profile the run left before its last step (nothing is written)."""
        if self.active is not None:
            self.active.stop()
            self.active = None
