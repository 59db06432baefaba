"""Where to split a document mask: forward+backward time of ``backend="split"`` for several ``min_block``
values (documents at least that long run as cuDNN blocks, the rest on the Triton kernels) against the
Triton kernels alone, on packed standard-library documents with lengths / 1, / 4 and / 16 (short documents).

    python benchmarks/split.py --sizes 16384,32768,65536 --out benchmarks/results/split_h100.json
"""
import argparse
import time

import torch

import bbm
from bbm import split
from common import environment, packed_doc_ids, stdlib_file_sizes, timed, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,32768,65536")
    ap.add_argument("--divisors", default="1,4,16", help="document lengths = file bytes / divisor")
    ap.add_argument("--min-blocks", default="256,512,1024,2048,4096")
    ap.add_argument("--dims", default="128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/split.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sizes = stdlib_file_sizes()
    rows = []
    for div in (int(x) for x in args.divisors.split(",")):
        for d in (int(x) for x in args.dims.split(",")):
            for n in (int(x) for x in args.sizes.split(",")):
                doc = packed_doc_ids(n, [max(1, s // div) for s in sizes], device=dev)
                mask = bbm.Mask.from_documents(doc, check=False)
                lengths = torch.unique_consecutive(doc[0], return_counts=True)[1]
                g = torch.Generator(device=dev).manual_seed(n + d)
                q, k, v = (torch.randn(1, args.heads, n, d, device=dev, dtype=torch.bfloat16, generator=g)
                           .requires_grad_() for _ in range(3))
                grad = torch.randn_like(q)
                row = {"divisor": div, "n": n, "d": d, "docs": len(lengths), "longest": int(lengths.max()),
                       "auto_min_block": split.min_block(q, mask)}
                run = lambda fn: timed(lambda: torch.autograd.grad(fn(), (q, k, v), grad), dev, repeat=args.repeat)
                row["triton_ms"] = run(lambda: bbm.attention(q, k, v, mask, backend="triton"))
                for mb in (int(x) for x in args.min_blocks.split(",")):
                    s = split.plan(mask, min_block=mb)
                    if s is not None:
                        scale = d ** -0.5
                        row[f"split_{mb}_ms"] = run(lambda: split.split_attention(q, k, v, s, scale))
                        row[f"split_{mb}_blocks"] = len(s.blocks)
                print(row, flush=True)
                rows.append(row)
                write_json(args.out, {"env": environment(dev), "rows": rows})
    mbs = args.min_blocks.split(",")
    print(f"{'div':>3} {'N':>6} {'D':>3} {'docs':>4} | {'triton':>7} | " + " ".join(f"{'>=' + m:>7}" for m in mbs))
    for r in rows:
        cells = " ".join(f"{r[f'split_{m}_ms']:7.2f}" if f"split_{m}_ms" in r else f"{'-':>7}" for m in mbs)
        print(f"{r['divisor']:>3} {r['n']:>6} {r['d']:>3} {r['docs']:>4} | {r['triton_ms']:7.2f} | {cells}")
    print(f"wrote {args.out} ({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
