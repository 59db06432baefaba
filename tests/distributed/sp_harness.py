"""Run a function in N local processes joined by a gloo process group (CPU tests of sequence parallelism)."""
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bbm.testing import document_positions, random_doc_ids


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


def packed_batch(b: int, n: int, vocab: int, max_docs: int, generator: torch.Generator) -> dict:
    """A loader-like batch: random tokens in random documents, positions restarting per document, labels the
    next token of the same document (-100 on each document's last token), the row's tail as padding."""
    doc_ids = random_doc_ids(b, n, max_docs, generator=generator)
    pad = torch.randint(0, n // 4, (b,), generator=generator)
    pos = torch.arange(n).expand(b, n)
    doc_ids = torch.where(pos >= n - pad[:, None], doc_ids[:, -1:] + 1, doc_ids)  # padding: its own document
    tokens = torch.randint(0, vocab, (b, n), generator=generator)
    position_ids = document_positions(doc_ids)
    same_doc = torch.cat([doc_ids[:, 1:] == doc_ids[:, :-1], torch.zeros(b, 1, dtype=torch.bool)], dim=1)
    labels = torch.where(same_doc, tokens.roll(-1, dims=1), -100)
    labels = torch.where(pos >= n - pad[:, None], -100, labels)
    return {"tokens": tokens, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}
