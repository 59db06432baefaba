"""Ulysses (DeepSpeed-Ulysses) sequence-parallel attention around ``bbm.attention``.

Each rank of a sequence-parallel group of size ``sp`` holds ``n = N / sp`` consecutive tokens of every
sample, for all heads. One all-to-all turns that into all ``N`` tokens for ``H / sp`` heads; the rank runs
ordinary attention on the whole sequence with the mask of the whole sequence (so bbm's tile metadata is the
unsharded one, built once per micro-batch and shared by all layers and all ranks); a second all-to-all
returns the output to ``n`` tokens x all heads.

Why not ``deepspeed.sequence.layer.DistributedAttention`` (DeepSpeed 0.19.8):
  * it works in ``(B, N, H, D)`` / ``(N, B, H, D)`` layouts and does three all-to-alls for q, k, v (its own
    TODO says to merge them); here q, k and v travel in one all-to-all in bbm's ``(B, H, N, D)`` layout;
  * it asserts ``Hkv >= sp``; here kv heads are replicated when ``sp`` is a multiple of ``Hkv``;
  * it needs ``deepspeed.comm`` (the CPU backend JIT-builds a shared-memory op on first use) while this runs
    on plain ``torch.distributed`` -- the same NCCL/gloo groups DeepSpeed uses -- so benchmarks and tests
    need no DeepSpeed engine;
  * its exchange is an ``autograd.Function`` writing into a caller-allocated buffer, which DeepSpeed notes
    ``torch.compile`` can trace into a silently zero gradient; here the exchange is kept out of compiled
    graphs (``torch.compiler.disable``).
The ALST path (``UlyssesSPAttentionHF``) is tied to Hugging Face Transformers' attention signature.
"""
import torch
import torch.distributed as dist

import bbm
from bbm._checks import fail
from bbm.masks import Mask


def kv_replication(n_heads: int, n_kv_heads: int, sp_size: int) -> int:
    """How many times each kv head is repeated so that ``sp`` ranks each get whole GQA groups; a clear
    error where the heads cannot be split over ``sp`` ranks."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        fail("n_kv_heads", f"a divisor of n_heads={n_heads}", n_kv_heads)
    if n_heads % sp_size:
        fail("n_heads", f"a multiple of the sequence parallel size {sp_size} (each rank attends over "
             f"n_heads / sp heads)", n_heads)
    if n_kv_heads % sp_size and sp_size % n_kv_heads:
        fail("n_kv_heads", f"a multiple or a divisor of the sequence parallel size {sp_size}", n_kv_heads)
    return max(1, sp_size // n_kv_heads)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with equal dim-0 chunks: chunk ``j`` goes to rank ``j``, chunk ``i`` of the
    result came from rank ``i``. The exchange is its own adjoint, so backward runs the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group), None


def _exchange(x, group):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


@torch.compiler.disable
def all_to_all(x, group):
    """Differentiable all-to-all over dim 0 (size = group size)."""
    return _AllToAll.apply(x, group)


def heads_to_sequence(tensors, sp_size: int, group):
    """``(B, H_i, n, D)`` tensors holding n tokens x all heads -> ``(B, H_i / sp, sp * n, D)``: all tokens of
    this rank's heads (head block ``rank``). One all-to-all moves every tensor."""
    b, _, n, d = tensors[0].shape
    heads = [t.shape[1] // sp_size for t in tensors]
    # (B, H, n, D) -> (sp, B, H/sp, n, D): head block j is sent to rank j; the tensors are packed along heads
    send = torch.cat([t.reshape(b, sp_size, h, n, d).transpose(0, 1) for t, h in zip(tensors, heads)], dim=2)
    recv = all_to_all(send, group)  # chunk i: rank i's tokens (positions i*n ... (i+1)*n - 1) of my heads
    # (sp, B, h, n, D) -> (B, h, sp * n, D): source ranks in order concatenate the sequence
    return [x.permute(1, 2, 0, 3, 4).reshape(b, h, sp_size * n, d) for x, h in zip(recv.split(heads, dim=2), heads)]


def sequence_to_heads(out, sp_size: int, group):
    """``(B, h, sp * n, D)`` (all tokens, this rank's heads) -> ``(B, sp * h, n, D)`` (my tokens, all heads),
    returned as a transposed view of a ``(B, n, H, D)`` buffer so the model's ``transpose(1, 2).reshape``
    into the output projection needs no copy."""
    b, h, n_all, d = out.shape
    n = n_all // sp_size
    send = out.reshape(b, h, sp_size, n, d).permute(2, 0, 1, 3, 4)  # token block j is sent to rank j
    recv = all_to_all(send, group)  # chunk i: rank i's heads (head block i) of my tokens
    return recv.permute(1, 3, 0, 2, 4).reshape(b, n, sp_size * h, d).transpose(1, 2)


class UlyssesAttention:
    """``attention(q, k, v, mask, **kw)`` over a sequence sharded across ``group``.

    q ``(B, Hq, n, D)``, k, v ``(B, Hkv, n, D)`` hold this rank's ``n`` consecutive tokens (rank ``r`` of the
    group holds positions ``r*n ... (r+1)*n - 1``, see ``shard_batch``); ``mask`` is the mask of the WHOLE
    sequence (``N = sp * n``, built from the unsharded doc ids), passed unchanged to ``attention_fn``.
    Returns ``(B, Hq, n, D)``. ``attention_fn`` defaults to ``bbm.attention``; the model's ``attend``
    (``q, k, v, batch_mask``) fits too: ``model.attention_fn = UlyssesAttention(groups.sp_group, attend)``."""

    def __init__(self, group, attention_fn=bbm.attention):
        self.group = group
        self.sp_size = dist.get_world_size(group)
        self.attention_fn = attention_fn

    def __call__(self, q, k, v, mask=None, **kwargs):
        if self.sp_size == 1:
            return self.attention_fn(q, k, v, mask, **kwargs)
        self._check(q, k, v, mask)
        repeat = kv_replication(q.shape[1], k.shape[1], self.sp_size)
        if repeat > 1:  # fewer kv heads than ranks: rank r gets kv head r // repeat, the one its q heads use
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        q, k, v = heads_to_sequence([q, k, v], self.sp_size, self.group)
        out = self.attention_fn(q, k, v, mask, **kwargs)
        return sequence_to_heads(out, self.sp_size, self.group)

    def _check(self, q, k, v, mask):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                fail(name, "a 4-d tensor (B, H, n_local, D)", getattr(t, "shape", type(t).__name__))
        if k.shape != v.shape or (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
            fail("q/k/v", "k and v of one shape, with q's batch, local length and head dim",
                 f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        inner = mask if isinstance(mask, Mask) else getattr(mask, "mask", None)  # a bbm.Mask, or a model BatchMask
        if isinstance(inner, Mask):
            n_all = q.shape[2] * self.sp_size
            if (inner.n_q, inner.n_k) != (n_all, n_all):
                fail("mask", f"the mask of the whole sequence (N = sp x local tokens = {self.sp_size} x "
                     f"{q.shape[2]} = {n_all}), built from the unsharded doc_ids",
                     f"a mask for Nq={inner.n_q}, Nk={inner.n_k}")
            if inner.heads != 1:
                fail("mask", "a mask shared by all heads (each rank attends over a subset of the heads)",
                     f"a mask with {inner.heads} heads")
