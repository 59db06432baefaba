"""Document masks, split by document.

A causal mask from ``Mask.from_documents`` (no window, no prefix) is block diagonal: no two documents
share a key. ``backend="split"`` runs every long document (``min_block``) as one plain causal attention
on cuDNN's fused kernels, which reach ~500 TFLOP/s on an H100 where a Triton loop reaches ~400
(benchmarks/NOTES_attention.md), and the shorter documents together as one block-sparse Triton launch
over the rest of the mask (the residual). The pieces fill disjoint rows of the output and the gradients.
They are issued round-robin on a few CUDA streams, the residual on the caller's, so short documents'
kernels run side by side instead of leaving the GPU half idle.

cuDNN builds a graph per shape (a few hundred ms), so a block runs at its length rounded up to one of 16
sizes per octave (``bucket``): the extra rows are the next tokens (or zeros at the sequence's end). Being
causal, the document's rows never see them, and their output is dropped and their gradient zeroed. The first
call for a shape of q, k and v builds the graphs of every size a block of that sequence can take (about 60 at
32k tokens; ``warm_up``), so that a training run pays for them once, up front, instead of in whichever step
first meets a document length.
"""
import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from bbm.masks import Mask
from bbm.masks.mask import document_starts

# A document is worth its own cuDNN call when its work is at least that of MIN_BLOCK tokens at 16 heads of
# 128 dims: below that the calls' host cost outweighs what cuDNN saves over the Triton kernels (on an H100,
# benchmarks/split.py: 1024 loses 10-30% on short documents, 2048 does not). Work grows with length squared,
# so the length scales as 1/sqrt(width).
MIN_BLOCK, MIN_BLOCK_WIDTH = 2048, 16 * 128
STREAMS = 4
_streams = {}
_warm = set()


@dataclass(frozen=True)
class Split:
    blocks: Tuple[Tuple[Optional[int], int, int], ...]  # (mask sample or None for all, start, length), longest first
    residual: Optional[Mask]  # the other documents; None when every token is in a block
    covered: torch.Tensor  # bool (Bm, N) on the host: the tokens in blocks
    min_block: int  # the shortest document that got a block
    _busy: dict = field(default_factory=dict, compare=False)  # busy_tiles by tile size

    def busy_tiles(self, tile: int) -> int:
        """Tiles of ``tile`` tokens (over the mask samples) holding a residual token: the only ones the
        residual's launches visit (each residual token attends to itself, so these have work; the rest
        have none). Counted once per tile size."""
        if tile not in self._busy:
            rows, n = self.covered.shape
            whole = torch.nn.functional.pad(self.covered, (0, -n % tile), value=True).view(rows, -1, tile).all(-1)
            self._busy[tile] = int((~whole).sum())
        return self._busy[tile]


def plan(mask: Mask, min_block: int) -> Optional[Split]:
    """The split of a causal document mask, or None if it is not one or has no document of ``min_block`` tokens.
    Built once per mask and threshold and cached on the mask (two device syncs: the document list goes to
    the host)."""
    if mask.documents is None or not mask.documents_causal:
        return None
    key = ("split", min_block)
    if key not in mask._meta:
        doc = mask.documents
        rows, n = doc.shape
        first = document_starts(doc).flatten().nonzero().squeeze(1)  # flat index of each document's first token
        length = torch.diff(first, append=first.new_tensor([rows * n]))  # runs never cross rows: each row starts one
        in_block = torch.repeat_interleave(length >= min_block, length, output_size=rows * n).view(rows, 1, n)
        first, length = torch.stack([first, length]).cpu()  # the block list goes to the host
        long = length >= min_block
        covered = torch.repeat_interleave(long, length).view(rows, n)
        residual = None if covered.all() else Mask(n_q=n, n_k=n, ranges=mask.ranges.masked_fill(in_block, 0))
        sample = (lambda f: f // n) if rows > 1 else (lambda f: None)
        spans = sorted(((sample(f), f % n, size) for f, size in zip(first[long].tolist(), length[long].tolist())),
                       key=lambda s: -s[2])
        mask._meta[key] = Split(tuple(spans), residual, covered, min_block) if spans else None
    return mask._meta[key]


def bucket(length: int) -> int:
    """``length`` rounded up to a multiple of 1/16 of its octave and of 64 (from 1024 on, at most 6.25% more)."""
    step = max(64, (1 << (length.bit_length() - 1)) // 16)
    return -(-length // step) * step


def bucket_sizes(shortest: int, longest: int):
    """Every length ``bucket`` gives to a block of ``shortest`` to ``longest`` tokens, in increasing order."""
    sizes = [bucket(shortest)]
    while sizes[-1] < bucket(longest):
        sizes.append(bucket(sizes[-1] + 1))
    return sizes


def min_block(q: torch.Tensor, mask: Mask) -> int:
    """The shortest document that gets its own block for queries like ``q`` (B, Hq, N, D); a mask shared by
    the batch makes each block B samples wide."""
    width = q.shape[1] * q.shape[3] * (q.shape[0] if mask.batch == 1 else 1)
    return max(1, math.ceil(MIN_BLOCK * math.sqrt(MIN_BLOCK_WIDTH / width)))


def plan_for(q: torch.Tensor, mask: Optional[Mask]) -> Optional[Split]:
    """``plan`` with the threshold for queries like ``q``."""
    return None if mask is None else plan(mask, min_block(q, mask))


class CudnnBlocks:
    """One document as plain attention on cuDNN (PyTorch's SDPA cuDNN operators, no dropout). Grouped
    K/V heads are repeated for the call and their gradients summed back."""

    @staticmethod
    def forward(q, k, v, scale: float):
        """Causal attention -> out, state (tensors the backward needs)."""
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, (lse, cum_q, cum_k, seed, offset)

    @staticmethod
    def backward(do, q, k, v, out, state, scale: float):
        lse, cum_q, cum_k, seed, offset = state
        heads_kv = k.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1]), out, lse, seed, offset, None,
            cum_q, cum_k, q.shape[2], k.shape[2], 0.0, True, scale=scale)
        return dq, _sum_heads(dk, heads_kv), _sum_heads(dv, heads_kv)


def _repeat_heads(t, heads):
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_heads(t, heads):
    return t if t.shape[1] == heads else t.unflatten(1, (heads, -1)).sum(2)


def split_attention(q, k, v, split: Split, scale: float, engine=CudnnBlocks) -> torch.Tensor:
    """Attention of validated q (B, Hq, N, D), k/v (B, Hkv, N, D) under the split mask. ``engine`` runs one
    block (tests pass a float64 one to check the assembly on CPU)."""
    return _SplitAttention.apply(q, k, v, split, float(scale), engine)


def warm_up(q, k, split: Split, scale: float, engine=CudnnBlocks):
    """Runs ``engine`` forward and backward once at every block size a split of q's sequence can use, on random
    inputs of the blocks' layout; once per engine, shape, dtype and scale. cuDNN keeps its graphs per thread,
    so the backward goes through autograd, which runs it on the thread that will run the split's backward."""
    b = 1 if split.blocks[0][0] is not None else q.shape[0]
    key = (engine, q.device, q.dtype, b, q.shape[1], k.shape[1], q.shape[3], split.min_block, q.shape[2], scale)
    if key in _warm:  # checked on every call: before any list is built
        return
    gen = torch.Generator(q.device).manual_seed(0)  # the run's random stream stays untouched
    with torch.enable_grad():
        for size in bucket_sizes(split.min_block, q.shape[2]):
            x = [torch.randn(b, heads, size, q.shape[3], device=q.device, dtype=q.dtype, generator=gen)
                 for heads in (q.shape[1], k.shape[1], k.shape[1], q.shape[1])]
            _Block.apply(*(t.requires_grad_() for t in x[:3]), scale, engine).backward(x[3])
    _warm.add(key)


class _Block(torch.autograd.Function):
    """One block of ``engine`` as an autograd node (for ``warm_up``)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, engine):
        out, state = engine.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, *state)
        ctx.scale, ctx.engine = scale, engine
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, *state = ctx.saved_tensors
        return (*ctx.engine.backward(do.contiguous(), q, k, v, out, tuple(state), ctx.scale), None, None)


def _side_streams(device):
    if device not in _streams:
        _streams[device] = [torch.cuda.Stream(device) for _ in range(STREAMS)]
    return _streams[device]


class _Streams:
    """Round-robin side streams that start after the caller's stream's work so far and that the caller's
    stream waits for on exit. On CPU everything runs inline."""

    def __init__(self, device):
        self.main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.side = _side_streams(device) if self.main is not None else []
        self.ready = self.main.record_event() if self.main is not None else None

    def on(self, i):
        if self.main is None:
            return contextlib.nullcontext()
        stream = self.side[i % len(self.side)]
        stream.wait_event(self.ready)
        return torch.cuda.stream(stream)

    def join(self, *tensors):
        """Make the caller's stream wait for the side streams; tensors made there are now used by it."""
        if self.main is not None:
            for s in self.side:
                self.main.wait_stream(s)
            for t in tensors:
                t.record_stream(self.main)


def _rows(t, sample, start, length):
    b = slice(None) if sample is None else slice(sample, sample + 1)
    return t[b, :, start:start + length]


def _bucketed(t, sample, start, length):
    """The block's rows extended to ``bucket(length)``, contiguous (the layout ``warm_up`` built graphs for):
    the next tokens, or zeros at the sequence's end."""
    size = bucket(length)
    if start + size <= t.shape[2]:
        return _rows(t, sample, start, size).contiguous()
    return torch.nn.functional.pad(_rows(t, sample, start, length), (0, 0, 0, size - length))


def _padded(t, sample, start, length):
    """A contiguous copy of the block's rows, zero on the extra rows: for the output gradient (so that the extra
    rows pass no gradient) and the output (so that both have one layout)."""
    return torch.nn.functional.pad(_rows(t, sample, start, length), (0, 0, 0, bucket(length) - length))


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split, scale, engine):
        from bbm.kernels.op import forward_pass, kernel_inputs  # imported lazily: CPU users never load Triton
        warm_up(q, k, split, scale, engine)
        streams = _Streams(q.device)
        pieces, states = [], []
        for i, span in enumerate(split.blocks):  # the blocks first, so the residual overlaps them
            with streams.on(i):
                o, state = engine.forward(*(_bucketed(t, *span) for t in (q, k, v)), scale)
            pieces.append(o)
            states.append(state)
        residual = ()
        if split.residual is not None:
            kq, kk, kv, meta, tensors, _ = kernel_inputs(q, k, v, split.residual)
            ctx.busy = (split.busy_tiles(meta.block_m), split.busy_tiles(meta.block_n))
            out, lse = forward_pass(kq, kk, kv, tensors, scale, [], ctx.busy)
            residual = (kq, kk, kv, lse, *tensors)
        else:
            out = torch.empty_like(q)
        streams.join(*pieces)
        for span, o in zip(split.blocks, pieces):
            _rows(out, *span).copy_(o[:, :, :span[2]])
        ctx.split, ctx.scale, ctx.engine = split, scale, engine
        ctx.state_sizes = [len(s) for s in states]
        ctx.save_for_backward(q, k, v, out, *[t for s in states for t in s], *residual)
        return out

    @staticmethod
    def backward(ctx, do):
        from bbm.kernels.op import backward_pass
        q, k, v, out, *rest = ctx.saved_tensors
        split = ctx.split
        states, at = [], 0
        for size in ctx.state_sizes:
            states.append(tuple(rest[at:at + size]))
            at += size
        streams = _Streams(q.device)
        grads = []
        for i, (span, state) in enumerate(zip(split.blocks, states)):
            with streams.on(i):
                grads.append(ctx.engine.backward(_padded(do, *span), *(_bucketed(t, *span) for t in (q, k, v)),
                                                 _padded(out, *span), state, ctx.scale))
        if split.residual is not None:
            kq, kk, kv, lse, *tensors = rest[at:]
            dq, dk, dv = backward_pass(do, kq, kk, kv, out, lse, tensors, ctx.scale, [], ctx.busy)
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        streams.join(*[g for gs in grads for g in gs])
        for span, gs in zip(split.blocks, grads):
            for full, part in zip((dq, dk, dv), gs):
                _rows(full, *span).copy_(part[:, :, :span[2]])
        return dq, dk, dv, None, None, None
