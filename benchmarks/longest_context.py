"""The longest context one GPU trains: one full step (forward, backward, AdamW) of a preset's model at
growing sequence lengths until it runs out of memory, with bbm attention on packed standard-library documents.

Memory as under DeepSpeed bf16 on one GPU, approximately: fp32 weights and gradients, AdamW's two fp32 states,
bf16 autocast, per-block activation checkpointing (no DeepSpeed needed, so it runs on a bare GPU box).

    python benchmarks/longest_context.py --config configs/gpt_125m_16k.yaml [--sizes 65536,131072,...]
"""
import argparse
import dataclasses
import time

import torch

from bbm.model import Decoder, build_mask
from bbm.testing import document_positions
from bbm.train.config import load_config
from common import environment, packed_doc_ids, results_path, stdlib_file_sizes, write_json


def batch(n, device):
    doc = packed_doc_ids(n, stdlib_file_sizes(), device=device)
    tokens = torch.randint(0, 256, (1, n), device=device)
    return tokens, document_positions(doc), doc, tokens.roll(-1, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/gpt_125m_16k.yaml")
    ap.add_argument("--sizes", default="65536,131072,262144,393216,524288,786432,1048576")
    ap.add_argument("--max-step-s", type=float, default=90.0, help="stop growing once a step takes this long")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/longest_context_<card>.json)")
    args = ap.parse_args()
    device = torch.device("cuda")
    out = args.out or results_path("longest_context", device)
    cfg = load_config(args.config, [])
    mc = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 257)
    model = Decoder(mc, checkpoint_layers=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        tokens, pos, doc, labels = batch(n, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens, pos, build_mask(doc, "bbm"), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            row = {"n": n, "fits": True, "loss": float(loss), "step_s": time.perf_counter() - t0,
                   "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
        except torch.OutOfMemoryError:
            row = {"n": n, "fits": False}
        rows.append(row)
        print(row, flush=True)
        write_json(out, {"env": environment(device), "config": args.config, "rows": rows})
        if not row["fits"] or row["step_s"] > args.max_step_s:
            break
        del loss


if __name__ == "__main__":
    main()
