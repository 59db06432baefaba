"""Float64 dense references for tests and benchmarks (independent of the tile metadata)."""
import math

import torch

from bbm.masks.documents import document_starts


def dense_attention(q, k, v, allowed, scale=None):
    """softmax(q k^T * scale, restricted to `allowed`) v in float64; rows with no allowed key give 0.
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), allowed bool broadcastable to (B, Hq, Nq, Nk) or None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: all -inf -> NaN -> 0
    return p @ v


def random_doc_ids(b, n, max_docs, generator=None, device="cpu"):
    """(B, N) int32 document ids: each row cut at random points into up to `max_docs` runs."""
    rows = []
    for _ in range(b):
        cuts = torch.randint(0, n, (max_docs - 1,), generator=generator)
        start = torch.zeros(n, dtype=torch.int32)
        start[cuts] = 1
        start[0] = 0
        rows.append(start.cumsum(0))
    return torch.stack(rows).to(torch.int32).to(device)


def document_positions(doc_ids):
    """Position ids restarting at 0 in every document (a run of equal ids), same shape as ``doc_ids``."""
    b, n = doc_ids.shape
    pos = torch.arange(n, device=doc_ids.device).expand(b, n)
    return pos - torch.where(document_starts(doc_ids), pos, 0).cummax(dim=1).values


def grads_against_reference(q, k, v, out, ref):
    """Backprop the same random cotangent through `out` and the float64 `ref`; return pairs of grads."""
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    return list(zip(got, want))


def scattered_banded(n, bandwidth, seed=0):
    """bool (1, 1, n, n): a band |i - j| < bandwidth seen through a random token permutation (scattered
    non-zeros with hidden structure, the case Reverse Cuthill-McKee reordering is for)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() < bandwidth
    shuffle = torch.randperm(n, generator=g)
    return band[shuffle][:, shuffle].view(1, 1, n, n)
