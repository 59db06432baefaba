"""Per-call CPU cost of bbm.attention vs compiled FlexAttention, beside their GPU-only time.

    python benchmarks/call_overhead.py
    python benchmarks/call_overhead.py --mask docs4 --size 32768 --heads 8 --kv-heads 4   # the 350M preset's shape

By default a 16k causal sliding-window mask (window 1024), bf16, B=1, H=16, D=128 on CUDA. "bbm" is the path
``auto`` takes (cuDNN ragged for document masks), and where that is not the Triton kernels, they are timed
too. "cpu per call": 50 calls issued back to back, timed before the synchronize; "wall per call": the same
including it; "gpu-only per call": 20 calls queued behind a long sleep kernel, so the CPU runs ahead and only the
GPU time is measured. A small mask makes the GPU work short enough for per-call CPU cost to show.
"""
import argparse
import time

import torch

import bbm
from attention_masks import build
from common import environment


def per_call(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        fn()
    cpu = (time.perf_counter() - t0) / 50 * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 50 * 1e3
    torch.cuda._sleep(int(2e9))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    torch.cuda.synchronize()
    return cpu, wall, start.elapsed_time(end) / 20


def main():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mask", default="window")
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    args = ap.parse_args()
    dev = torch.device("cuda")
    make, mask_mod, n, _ = build(args.mask, args.size, dev)
    mask = make()
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for heads in (args.heads, args.kv_heads, args.kv_heads))
    grad = torch.randn_like(q)
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = args.heads != args.kv_heads
    chosen = bbm.choose_backend(q, mask)
    runs = {f"bbm ({chosen})": lambda: bbm.attention(q, k, v, mask),
            "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)}
    if chosen != "triton":  # the Triton kernels as well
        runs["bbm (triton)"] = lambda: bbm.attention(q, k, v, mask, backend="triton")
    print(environment(dev))
    for name, fn in runs.items():
        for what, call in (("fwd", fn), ("f+b", lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad))):
            cpu, wall, gpu = per_call(call)
            print(f"{name} {what}: cpu per call {cpu:.3f} ms, wall per call {wall:.3f} ms, "
                  f"gpu-only per call {gpu:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
