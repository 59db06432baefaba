"""Reverse Cuthill-McKee on a scattered banded mask: tiles touched before and after reordering.

A band of half-width `bandwidth` seen through a random token permutation has its non-zeros scattered over
almost every tile; RCM recovers an ordering that gathers them near the diagonal.

    python benchmarks/reorder.py [--out benchmarks/results/reorder_cpu.json]
"""
import argparse
import time

import torch

import bbm
from bbm.testing import scattered_banded
from common import RESULTS, environment, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1024,4096,8192")
    ap.add_argument("--bandwidths", default="8,64")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "reorder_cpu.json"))
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for bw in (int(x) for x in args.bandwidths.split(",")):
            allowed = scattered_banded(n, bw)
            plain = bbm.Mask.from_dense(allowed, reorder=None)
            t0 = time.perf_counter()
            reordered = bbm.Mask.from_dense(allowed, reorder="rcm")
            rcm_ms = (time.perf_counter() - t0) * 1e3
            b = args.block
            before, after = plain.tiles_touched(b, b), reordered.tiles_touched(b, b)
            total = plain.tile_summary(b, b)["tiles"]
            rows.append({"n": n, "bandwidth": bw, "density": plain.density, "tiles": total,
                         "touched_before": before, "touched_after": after, "rcm_ms": rcm_ms})
            print(f"N={n:>5} band={bw:>3} density={plain.density:.4f} tiles touched {before:>6}/{total} -> "
                  f"{after:>6}/{total} ({before / after:5.1f}x fewer), RCM {rcm_ms:7.1f} ms", flush=True)
    write_json(args.out, {"env": environment(torch.device("cpu")), "block": args.block, "rows": rows})


if __name__ == "__main__":
    main()
