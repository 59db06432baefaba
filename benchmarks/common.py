"""Shared benchmark inputs: document lengths from the Python standard library, packed doc ids, timing."""
import json
import os
import platform
import random
import re
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from bbm._files import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def stdlib_file_sizes(seed: int = 0):
    """Byte sizes of the standard library's .py files (this interpreter's), shuffled with a fixed seed."""
    root = Path(os.path.dirname(os.__file__))
    sizes = sorted(p.stat().st_size for p in root.rglob("*.py") if p.stat().st_size > 0)
    random.Random(seed).shuffle(sizes)
    return sizes


def packed_doc_ids(n: int, lengths, batch: int = 1, device="cpu") -> torch.Tensor:
    """(batch, n) int32 ids: consecutive documents of the given lengths (cycled, the last one cut at n)."""
    rows, i = [], 0
    for _ in range(batch):
        ids, filled, doc = [], 0, 0
        while filled < n:
            length = min(max(1, lengths[i % len(lengths)]), n - filled)
            ids.append(torch.full((length,), doc, dtype=torch.int32))
            filled, doc, i = filled + length, doc + 1, i + 1
        rows.append(torch.cat(ids))
    return torch.stack(rows).to(device)


def timed(fn, device, repeat: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def environment(device) -> dict:
    import triton
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"card": card, "torch": torch.__version__, "triton": triton.__version__, "date": date.today().isoformat()}


def card_tag(device, gpus: int = 1) -> str:
    """The machine as a results file's name says it: ``h100``, ``2xh200``, ``cpu``."""
    if device.type != "cuda":
        tag = "cpu"
    else:
        name = torch.cuda.get_device_name(device).replace("NVIDIA", "").strip()
        model = re.search(r"\b[A-Z]{1,2}\d{2,4}[A-Z]?\b", name)  # H100, H200, A100, L40S, A10G
        tag = (model.group(0) if model else re.sub(r"\W+", "_", name)).lower()
    return f"{gpus}x{tag}" if gpus > 1 else tag


def results_path(stem: str, device, gpus: int = 1) -> Path:
    """A benchmark's default ``--out``: ``benchmarks/results/<stem>_<card_tag>.json``."""
    return RESULTS / f"{stem}_{card_tag(device, gpus)}.json"


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(payload, indent=2))


def training_overrides(steps: int, run_dir) -> list:
    """Config overrides of a timed training run: ``steps`` optimizer steps, a metrics record every step; no
    progress bar, W&B, evaluation or checkpoints."""
    return [f"run.max_steps={steps}", "metrics.log_every=1", "metrics.progress_bar=false", "wandb.mode=disabled",
            "eval.every=0", "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=none",
            f"run.dir={run_dir}"]


def median_after(records, warmup: int, key: str):
    """Median of a metric over the records of the steps after ``warmup`` (None where the run has none)."""
    values = [r[key] for r in records if r["step"] > warmup]
    return statistics.median(values) if values and values[0] is not None else None
