"""One layer's attention, forward + backward, on a preset's real packed micro-batches: each attention backend (and
bbm path) on the documents the training run meets, batch by batch, with the model's heads and memory order.

    python benchmarks/train_batches.py                                  # ~350M preset at 32k, its first 36 batches
    python benchmarks/train_batches.py --backends bbm,bbm:triton,flex --batches 10 data.tokenizer=...

The training throughput (benchmarks/train_throughput.py) is attention plus everything else; this shows the
attention part alone and where each path wins (by document count and length). q, k, v are random, in the
(B, N, H, D) memory the model's projections leave them in. Results: --out (default
benchmarks/results/train_batches_<card>.json) and a table on stdout.
"""
import argparse
from pathlib import Path

import torch

from common import environment, results_path, timed, write_json  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]


def batches(cfg, count: int):
    """The first ``count`` micro-batches of the preset's data, as a training run on one rank reads them."""
    from bbm.data import PackedLoader, prepare
    loader = PackedLoader(prepare(cfg.data), cfg.run.seq_len, cfg.run.micro_batch_size, rank=0, world_size=1,
                          seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer, prefetch=0)
    stream = iter(loader)
    return [next(stream) for _ in range(count)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "gpt_350m_32k.yaml"))
    ap.add_argument("--backends", default="bbm,bbm:triton,flex",
                    help="model.attention values; bbm:PATH forces bbm.attention's path (ragged, triton, sdpa)")
    ap.add_argument("--batches", type=int, default=36)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="results JSON (default benchmarks/results/train_batches_<card>.json)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.tokenizer=PATH")
    args = ap.parse_args()
    from bbm.model import attend, build_mask
    from bbm.train import load_config

    cfg = load_config(args.config, args.overrides)
    mc = cfg.model
    device = torch.device("cuda")
    b, n = cfg.run.micro_batch_size, cfg.run.seq_len
    heads, kv_heads = mc.n_heads, mc.kv_heads

    def rand(h):  # (B, N, H, D) memory seen as (B, H, N, D)
        return torch.randn(b, n, h, mc.head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    grad = rand(heads).detach()
    names = args.backends.split(",")
    rows, totals = [], dict.fromkeys(names, 0.0)
    print(f"{'batch':>5} {'docs':>5} {'shortest':>8} {'longest':>8} {'density':>8} " +
          " ".join(f"{name + ' ms':>13}" for name in names))
    for i, batch in enumerate(batches(cfg, args.batches)):
        doc = batch["doc_ids"].to(device)
        lengths = torch.unique_consecutive(doc[0], return_counts=True)[1]
        row = {"batch": i, "documents": len(lengths), "shortest": int(lengths.min()), "longest": int(lengths.max()),
               "density": build_mask(doc, "bbm", check=False).density}  # of the documents' mask, whatever the backend
        for name in names:
            backend, _, path = name.partition(":")
            batch_mask = build_mask(doc, backend, bbm_backend=path or "auto", check=False)
            row[name] = timed(lambda: attend(q, k, v, batch_mask.layer(0)).backward(grad), device, repeat=args.repeat,
                              warmup=2)
            totals[name] += row[name]
        rows.append(row)
        print(f"{i:>5} {row['documents']:>5} {row['shortest']:>8} {row['longest']:>8} {row['density']:>8.3f} " +
              " ".join(f"{row[name]:>13.2f}" for name in names), flush=True)
    env = environment(device)
    print(f"\n{Path(args.config).name}, {b} x {n} tokens, {heads}:{kv_heads} heads of {mc.head_dim}: {env}")
    base = totals[names[0]]
    for name in names:
        print(f"{name:<12} {totals[name]:9.1f} ms over {len(rows)} batches   {totals[name] / base:5.2f}x {names[0]}'s time")
    out = Path(args.out) if args.out else results_path("train_batches", device)
    write_json(out, {"config": Path(args.config).name, "overrides": args.overrides, "environment": env,
                     "backends": names, "totals_ms": totals, "rows": rows})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
