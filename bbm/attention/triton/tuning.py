"""Kernel configurations: a few candidates per head dim, timed once on the real inputs and cached per
(GPU, head dim, dtype, mask family, direction, size class) in memory and in a JSON file
(``$BBM_TUNING_CACHE``, default ``~/.cache/bbm/tuning.json``). The interpreter never tunes: it runs
small tiles so CPU tests cover many tiles on tiny shapes. ``BBM_AUTOTUNE=0`` takes the first candidate.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from bbm._files import write_atomic


@dataclass(frozen=True)
class Config:
    """Mask tiles (tile_m x tile_n) and, inside them, the blocks each kernel works on:
    forward block_m x block_n; backward dK/dV programs own `big` keys and step over `small` queries,
    dQ programs own `big` queries and step over `small` keys."""
    tile_m: int
    tile_n: int
    block_m: int
    block_n: int
    fwd_warps: int
    fwd_stages: int
    big: int
    small: int
    bwd_warps: int
    bwd_stages: int

    def check(self):
        for name in ("block_m", "big"):
            if self.tile_m % getattr(self, name):
                raise ValueError(f"config.{name}: expected a divisor of tile_m={self.tile_m}, got {getattr(self, name)}")
        for name in ("block_n", "big", "small"):
            if self.tile_n % getattr(self, name):
                raise ValueError(f"config.{name}: expected a divisor of tile_n={self.tile_n}, got {getattr(self, name)}")
        if self.tile_m % self.small:
            raise ValueError(f"config.small: expected a divisor of tile_m={self.tile_m}, got {self.small}")
        return self


INTERPRETER = Config(32, 32, 32, 32, 4, 1, 32, 16, 4, 1)
META_TILE = (128, 128)

# (block_m, block_n, warps, stages) forward; (big, small, warps, stages) backward; the first is the default
_FWD = {64: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
        128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)]}
_BWD = {64: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 1)]}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_class(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def candidates(d: int, direction: str):
    """Configs to try for head dim d; the forward ones pair with the default backward and vice versa."""
    fwd, bwd = _FWD[head_dim_class(d)], _BWD[head_dim_class(d)]
    if direction == "fwd":
        return [Config(*META_TILE, *f, *bwd[0]) for f in fwd]
    return [Config(*META_TILE, *fwd[0], *b) for b in bwd]


_memory = {}


def _cache_path() -> Path:
    return Path(os.environ.get("BBM_TUNING_CACHE", Path.home() / ".cache" / "bbm" / "tuning.json"))


def _load_disk() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk(key: str, cfg: Config):
    path = _cache_path()
    try:
        data = _load_disk()
        data[key] = cfg.__dict__
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs re-tuning


def _time_ms(run, reps: int = 10) -> float:
    run()  # compile + warm up
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def pick(direction: str, device: torch.device, d: int, dtype: torch.dtype, family: str, rows: int, run) -> Config:
    """The config for this key: cached, or the fastest candidate of ``run(config)`` (which launches the
    kernel on the real inputs). ``rows`` (batch x heads x Nq) keys the size class, a power of two."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    slot = (device.index, head_dim_class(d), dtype, family, direction, rows.bit_length())
    if slot in _memory:  # the per-call path: no string building, no device queries
        return _memory[slot]
    key = (f"{torch.cuda.get_device_name(device)}|d{head_dim_class(d)}|{dtype}|{family}|{direction}"
           f"|rows2^{rows.bit_length()}")
    disk = _load_disk().get(key)
    if disk is not None:
        _memory[slot] = Config(**disk)
        return _memory[slot]
    options = candidates(d, direction)
    if os.environ.get("BBM_AUTOTUNE", "1") == "0":
        _memory[slot] = options[0]
        return options[0]
    times = {}
    for cfg in options:
        try:
            times[cfg] = _time_ms(lambda: run(cfg))
        except triton.runtime.errors.OutOfResources:
            continue
    best = min(times, key=times.get)
    _memory[slot] = best
    _save_disk(key, best)
    return best
