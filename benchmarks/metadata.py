"""Build time and memory of document-mask metadata (ranges + tile lists), 8k-128k tokens.

    python benchmarks/metadata.py [--device cuda] [--out benchmarks/results/metadata_h100.json]
"""
import argparse

import torch

import bbm
from common import environment, packed_doc_ids, results_path, stdlib_file_sizes, timed, write_json


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="8192,16384,32768,65536,131072")
    ap.add_argument("--block", default="128,64", help="block_m,block_n of the tile lists")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/metadata_<card>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    bm, bn = (int(x) for x in args.block.split(","))
    sizes = stdlib_file_sizes()
    rows = []
    for dist, lengths in (("bytes", sizes), ("bytes/4", [max(1, s // 4) for s in sizes])):
        for n in (int(x) for x in args.sizes.split(",")):
            doc = packed_doc_ids(n, lengths, device=device)

            def build():
                return bbm.Mask.from_documents(doc, check=False).tile_meta(bm, bn)

            ms = timed(build, device, repeat=10 if device.type == "cpu" else 50)
            mask = bbm.Mask.from_documents(doc)
            meta = mask.tile_meta(bm, bn)
            mem = tensor_bytes(mask.ranges, meta.classes, meta.q_count_full, meta.q_count, meta.q_idx,
                               meta.k_count_full, meta.k_count, meta.k_idx)
            s = meta.summary()
            rows.append({"lengths": dist, "n": n, "docs": int(doc.max()) + 1, "density": mask.density,
                         "build_ms": ms, "metadata_MiB": mem / 2**20, "dense_mask_MiB": n * n / 2**20,
                         "tiles_empty": s["empty"], "tiles_partial": s["partial"], "tiles_full": s["full"]})
            r = rows[-1]
            print(f"{dist:>8} N={n:>6} docs={r['docs']:>5} density={r['density']:.3f} build={ms:8.3f} ms "
                  f"metadata={r['metadata_MiB']:7.2f} MiB (dense bool mask {r['dense_mask_MiB']:8.0f} MiB) "
                  f"tiles e/p/f={s['empty']}/{s['partial']}/{s['full']}", flush=True)
    out = args.out or results_path("metadata", device)
    write_json(out, {"env": environment(device), "block": [bm, bn], "rows": rows})
    print(f"wrote {out} ({environment(device)})")


if __name__ == "__main__":
    main()
