"""Run a function in N local processes joined by a gloo process group (CPU tests of sequence parallelism)."""
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp



def run(fn, world_size: int, *args):
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; a failure in any re-raises here.
    Forked, not spawned: the children inherit the imported modules instead of importing torch again (seconds
    each on the 2-core CI); like DataLoader workers they use one intra-op thread, which keeps fork safe."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args), nprocs=world_size,
                           join=True, start_method="fork")


def _entry(rank, fn, world_size, store, args):
    torch.set_num_threads(1)  # the CPU CI has 2 cores for all processes
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))  # a mismatched collective fails instead of hanging
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
