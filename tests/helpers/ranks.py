"""Run a function as N ranks: local processes joined by a gloo process group (``run``), or threads of this process
joined by torch's threaded process group (``run_threads``: ranks that share a compiled function or a GPU)."""
import os
import tempfile
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(fn, world_size: int, *args, limit_s: float = 300):
    """``fn(rank, world_size, *args)`` in ``world_size`` processes; a failure in any re-raises here, and ranks
    still running after ``limit_s`` seconds are killed and reported. The processes fork from a fork server, a
    fresh interpreter without threads that imports torch and bbm once (forking pytest itself, which by then holds
    threads of OpenMP, pyarrow's jemalloc and tqdm, can deadlock a child). Each rank uses one intra-op thread."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "bbm", "helpers.ranks"])
    with tempfile.TemporaryDirectory() as tmp:
        ranks = mp.start_processes(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args),
                                   nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + limit_s
        while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                running = [rank for rank, p in enumerate(ranks.processes) if p.is_alive()]
                for p in ranks.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__}: ranks {running} of {world_size} still ran after {limit_s} s")


def _entry(rank, fn, world_size, store, args):
    torch.set_num_threads(1)  # the CPU CI has 2 cores for all processes
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))  # a mismatched collective fails instead of hanging
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_threads(fn, world_size: int):
    """``fn(rank, world_size)`` on ``world_size`` threads, each a rank of a threaded process group; the first
    failure re-raises here."""
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    threaded._install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    store, errors = dist.HashStore(), []

    def rank_main(rank):
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            fn(rank, world_size)
        except BaseException:
            errors.append(f"rank {rank}: {traceback.format_exc()}")
            threaded.ProcessLocalGroup.exception_handle(RuntimeError("a rank failed"))  # wakes the others
        finally:
            dist.destroy_process_group()

    try:
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        threaded._uninstall_threaded_pg()
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads), "a rank did not finish"
