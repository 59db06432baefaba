"""Packing efficiency (non-padding fraction) and throughput on one CPU core, N = 4k..128k.

    python benchmarks/packing.py [--sizes 4096,...,131072] [--shuffle-buffer 1024] [--out benchmarks/results/packing_cpu.json]

Corpora: the embedded one (the Python standard library's .py files, byte-level, prepared with
bbm.data.prepare) and a synthetic long-tailed one (log-normal lengths: median ~665 tokens, mean ~2.4k,
a tail past 100k; random ids of a 50k vocabulary). For each N, one epoch goes through a PackedLoader
(batch 1, no prefetch thread, the process pinned to one core): "packed tok/s" is corpus tokens over the
wall time of the whole loader (split, best-fit-decreasing windows, tokens / labels / position ids / doc ids
as tensors); "plan tok/s" times the split and best-fit-decreasing windows alone.
"""
import argparse
import os
import tempfile
import time

import numpy as np

from bbm.data import DataConfig, PackedLoader, TokenDataset, prepare, write_dataset
from bbm.data.packing import pack_windows, split_documents
from common import RESULTS, write_json


def synthetic(path, total_tokens: int, seed: int = 0):
    """A dataset of log-normal document lengths with random ids, end-of-document id 49999."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(6.5, 1.6, 2 * total_tokens // 2400)).astype(np.int64)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), total_tokens) + 1]
    tokens = rng.integers(0, 49999, int(lengths.sum()), dtype=np.uint16)
    tokens[np.cumsum(lengths) - 1] = 49999
    return write_dataset(path, tokens, lengths, vocab_size=50000, eod_id=49999, pad_id=49999, source="lognormal")


def measure(dataset_dir, seq_len: int, shuffle_buffer: int) -> dict:
    ds = TokenDataset(dataset_dir)
    # Planning alone: one epoch's split and windows, as the loader does them.
    t0 = time.perf_counter()
    rng = np.random.default_rng([0, 0])
    _, _, lengths = split_documents(ds.lengths[rng.permutation(ds.num_documents)], seq_len)
    n_seq = sum(len(ptr) - 1 for _, ptr in pack_windows(lengths, seq_len, shuffle_buffer, rng))
    plan_s = time.perf_counter() - t0
    # The whole loader over the same epoch.
    loader = PackedLoader(dataset_dir, seq_len, 1, shuffle_buffer=shuffle_buffer, prefetch=0)
    t0 = time.perf_counter()
    batches = 0
    for _ in loader:
        batches += 1
        if loader.epoch == 1:
            break
    loader_s = time.perf_counter() - t0
    assert batches == n_seq
    return {"seq_len": seq_len, "documents": ds.num_documents, "tokens": ds.num_tokens, "sequences": n_seq,
            "split_documents": int(np.count_nonzero(ds.lengths > seq_len)),
            "non_padding": ds.num_tokens / (n_seq * seq_len),
            "plan_tok_per_s": ds.num_tokens / plan_s, "packed_tok_per_s": ds.num_tokens / loader_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--synthetic-tokens", type=int, default=32_000_000)
    ap.add_argument("--cache-dir", default=".cache/datasets")
    ap.add_argument("--out", default=str(RESULTS / "packing_cpu.json"))
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # one core
    t0 = time.perf_counter()
    stdlib = prepare(DataConfig(cache_dir=args.cache_dir, num_workers=1), progress=False)
    prepare_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpora = (("stdlib (bytes)", stdlib), ("log-normal", synthetic(os.path.join(tmp, "lognormal"),
                                                                         args.synthetic_tokens)))
        print(f"{'corpus':<15} {'N':>7} {'docs':>6} {'split':>5} {'seqs':>6} {'non-pad':>8} "
              f"{'plan Mtok/s':>11} {'packed Mtok/s':>13}")
        for name, path in corpora:
            for seq_len in (int(x) for x in args.sizes.split(",")):
                row = dict(corpus=name, **measure(path, seq_len, args.shuffle_buffer))
                rows.append(row)
                print(f"{name:<15} {seq_len:>7} {row['documents']:>6} {row['split_documents']:>5} "
                      f"{row['sequences']:>6} {100 * row['non_padding']:>7.2f}% {row['plan_tok_per_s'] / 1e6:>11.0f} "
                      f"{row['packed_tok_per_s'] / 1e6:>13.1f}")
    print(f"(stdlib prepare, cached or not: {prepare_s:.1f} s; shuffle buffer {args.shuffle_buffer})")
    write_json(args.out, {"shuffle_buffer": args.shuffle_buffer, "cpu": os.cpu_count(), "rows": rows})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
