"""FLOP counting that credits only the attention pairs a mask allows, peak throughput, and the timing
of the chosen attention against dense causal SDPA on a batch's mask."""
import time
from typing import Optional

import torch
import torch.nn.functional as F

from bbm.model import LayerMask, attend

# bf16 dense tensor-core peaks (TFLOP/s per device), matched against torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def step_flops(matmul_params: int, tokens: int, n_layers: int, n_heads: int, head_dim: int, pairs: int) -> float:
    """Training FLOPs (forward + backward): 6 * params * tokens + 12 * layers * heads * head_dim * pairs."""
    return 6.0 * matmul_params * tokens + 12.0 * n_layers * n_heads * head_dim * pairs


def dense_pairs(batch: int, seq_len: int) -> int:
    """Pairs under the dense convention: every query with every key of its sequence (N^2)."""
    return batch * seq_len * seq_len


def peak_tflops(configured: Optional[float], device: torch.device) -> Optional[float]:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd_bwd(fn, leaves, repeats: int) -> float:
    """Best wall time (s) of forward + backward of ``fn(q, k, v)`` on ``(B, H, N, D)`` views of the ``(B, N, H, D)``
    leaves, after one warm-up call."""
    best = float("inf")
    for i in range(repeats + 1):
        for t in leaves:
            t.grad = None
        _sync(leaves[0].device)
        start = time.perf_counter()
        out = fn(*(t.transpose(1, 2) for t in leaves))
        out.backward(torch.ones_like(out))
        _sync(leaves[0].device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def attention_gain(layer_mask: LayerMask, n_heads: int, n_kv_heads: int, head_dim: int, dtype, device,
                   repeats: int = 2) -> dict:
    """Times one layer's attention (fwd + bwd) on this batch's mask with the chosen backend and with dense
    causal SDPA, on random q, k, v of the model's shape and memory order; gain = dense time / chosen time."""
    b, n = layer_mask.batch, layer_mask.mask.n_q
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(h):  # (B, N, H, D) memory, as the model's projections leave q, k and v
        return torch.randn(b, n, h, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()

    leaves = rand(n_heads), rand(n_kv_heads), rand(n_kv_heads)
    gqa = n_heads != n_kv_heads
    chosen = _time_fwd_bwd(lambda q, k, v: attend(q, k, v, layer_mask), leaves, repeats)
    dense = _time_fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                          leaves, repeats)
    return {"attention_ms": chosen * 1e3, "dense_causal_ms": dense * 1e3, "gain_vs_dense": dense / chosen}
