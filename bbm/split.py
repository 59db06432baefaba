"""Document masks, split by document.

A causal mask from ``Mask.from_documents`` (no window, no prefix) is block diagonal: no two documents
share a key. ``backend="split"`` runs every long document (``min_block``) as one plain causal attention
on cuDNN's fused kernels, which reach ~500 TFLOP/s on an H100 where a Triton loop reaches ~400
(benchmarks/NOTES_attention.md), and the shorter documents together as one block-sparse Triton launch
over the rest of the mask (the residual). The pieces fill disjoint rows of the output and the gradients.
They are issued round-robin on a few CUDA streams, the residual on the caller's, so short documents'
kernels run side by side instead of leaving the GPU half idle.

cuDNN builds a graph per shape and strides (a slow build), so a block runs at its length rounded up to one of
16 sizes per octave (``bucket``), as a view of q, k and v (no copy; grouped K/V heads go in as they are):
the extra rows are the next tokens (or, at the sequence's end, zeros in a buffer of the same strides). Being
causal, the document's rows never see them, and their output is dropped and their gradient zeroed. The first
call for a layout of q, k and v builds the graphs of every size a block of that sequence can take (about 60 at
32k tokens; ``warm_up``), so that a training run pays for them once, up front, instead of in whichever step
first meets a document length.
"""
import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from bbm._checks import cudnn_takes
from bbm.masks import Mask
from bbm.masks.mask import document_spans, to_device

# A document is worth its own cuDNN call when its work is at least that of MIN_BLOCK tokens at 16 heads of
# 128 dims: below that the calls' host cost outweighs what cuDNN saves over the Triton kernels (on an H100,
# benchmarks/split.py: 1024 loses 10-30% on short documents, 2048 does not). Work grows with length squared,
# so the length scales as 1/sqrt(width).
MIN_BLOCK, MIN_BLOCK_WIDTH = 2048, 16 * 128
STREAMS = 4
_streams = {}
_warm = {}  # warm_up's layout key -> the threads whose cuDNN graph cache it filled


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
    Built once per mask and threshold and cached on the mask, on the host from the mask's host ids (a device sync
    to copy them, unless the mask was built from host ids)."""
    if mask.documents is None or not mask.documents_causal:
        return None
    key = ("split", min_block)
    if key not in mask._meta:
        doc = mask.documents
        rows, n = doc.shape
        first, length = document_spans(mask.host_documents())  # the host decides the blocks
        long = length >= min_block
        covered = torch.repeat_interleave(long, length).view(rows, n)
        residual = None
        if not covered.all():  # the other documents keep their rows' key ranges; the blocks' rows get none
            in_block = to_device(covered, doc.device).view(rows, 1, n)
            residual = Mask(n_q=n, n_k=n, ranges=mask.ranges.masked_fill(in_block, 0))
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


def block_size(length: int, n: int) -> int:
    """The rows a block of a ``length``-token document runs with in a sequence of ``n`` tokens."""
    return min(bucket(length), n)


def block_sizes(shortest: int, n: int):
    """Every ``block_size`` of a document of at least ``shortest`` tokens in a sequence of ``n``, increasing."""
    return sorted({min(size, n) for size in bucket_sizes(shortest, n)})


def supported(q: torch.Tensor) -> bool:
    """Whether PyTorch's cuDNN attention takes queries like ``q`` (B, Hq, N, D) (``cudnn_takes``) and
    deterministic algorithms are not requested (that backward is not bitwise reproducible; the Triton kernels
    are)."""
    return (cudnn_takes(q) and torch.backends.cudnn.is_available()
            and not torch.are_deterministic_algorithms_enabled())


def min_block(q: torch.Tensor, mask: Mask) -> int:
    """The shortest document that gets its own block for queries like ``q`` (B, Hq, N, D); a mask shared by
    the batch makes each block B samples wide."""
    width = q.shape[1] * q.shape[3] * (q.shape[0] if mask.batch == 1 else 1)
    return max(1, math.ceil(MIN_BLOCK * math.sqrt(MIN_BLOCK_WIDTH / width)))


def plan_for(q: torch.Tensor, mask: Optional[Mask]) -> Optional[Split]:
    """``plan`` with the threshold for queries like ``q``."""
    return None if mask is None else plan(mask, min_block(q, mask))


class CudnnBlocks:
    """One document as plain causal attention on cuDNN (PyTorch's SDPA cuDNN operators, no dropout). Grouped
    K/V heads go in as they are: cuDNN reads them per query head and sums their gradients."""

    @staticmethod
    def forward(q, k, v, scale: float):
        """Causal attention -> out, state (tensors the backward needs)."""
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, (lse, cum_q, cum_k, seed, offset)

    @staticmethod
    def backward(do, q, k, v, out, state, scale: float):
        lse, cum_q, cum_k, seed, offset = state
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, q.shape[2], k.shape[2], 0.0, True, scale=scale)


def split_attention(q, k, v, split: Split, scale: float, engine=CudnnBlocks) -> torch.Tensor:
    """Attention of validated q (B, Hq, N, D), k/v (B, Hkv, N, D) under the split mask. ``engine`` runs one
    block (tests pass a float64 one to check the assembly on CPU)."""
    return _SplitAttention.apply(q, k, v, split, float(scale), engine)


def warm_up(q, k, v, split: Split, scale: float, engine=CudnnBlocks):
    """Runs ``engine`` forward and backward once at every block size a split of q's sequence can use, on random
    inputs of the blocks' layout (views of buffers with the strides of q, k and v); once per engine, layout,
    dtype, scale and thread. cuDNN keeps its graphs per thread, so the backward goes through autograd, which runs
    it on the thread that will run the split's backward. A later call on another thread (activation
    checkpointing recomputes the forward on the backward's thread) runs the forwards only. The warm-up's tensors
    are saved past any saved-tensor hooks: a checkpoint counts the tensors a forward saves, and only the first
    forward warms up."""
    sample = 0 if split.blocks[0][0] is not None else None
    key = (engine, q.device, q.dtype, sample, q.shape, q.stride(), k.shape, k.stride(), v.stride(), split.min_block,
           scale)
    threads = _warm.setdefault(key, set())
    if threading.get_ident() in threads:  # checked on every call: before any list is built
        return
    gen = torch.Generator(q.device).manual_seed(0)  # the run's random stream stays untouched
    buffers = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_(generator=gen)
               for t in (q, k, v)]
    sizes = block_sizes(split.min_block, q.shape[2])
    if threads:  # the backward's graphs exist where autograd runs them
        with torch.no_grad():
            for size in sizes:
                engine.forward(*(_rows(t, sample, 0, size) for t in buffers), scale)
    else:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
            for size in sizes:
                x = [_rows(t, sample, 0, size).detach().requires_grad_() for t in buffers]
                out = _Block.apply(*x, scale, engine)
                out.backward(torch.empty_like(out).normal_(generator=gen))
    threads.add(threading.get_ident())


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
        grad = torch.empty_like(out).copy_(do)  # the output's layout, as the split's backward passes it
        return (*ctx.engine.backward(grad, q, k, v, out, tuple(state), ctx.scale), None, None)


def _as_is(t):
    return t


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
    t = t if sample is None else t.narrow(0, sample, 1)
    return t.narrow(2, start, length)


def _dense(t):
    """``t`` when its layout is dense (B, H, N, D) or (B, N, H, D), else a contiguous copy: blocks are views of
    it, and ``warm_up`` rebuilds its strides."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def _block(t, sample, start, length):
    """The block's rows extended to ``block_size``, as a view of ``t`` (the next tokens), or, where the sequence
    ends first, a copy in a buffer of t's strides with zeros on the extra rows: either way the strides of t,
    the layout ``warm_up`` built graphs for."""
    size = block_size(length, t.shape[2])
    if start + size <= t.shape[2]:
        return _rows(t, sample, start, size)
    tail = _rows(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device), sample, 0, size)
    return _fill(tail, _rows(t, sample, start, length))


def _block_grad(do, out, sample, start, length):
    """The output gradient of a block in the layout of its output ``out``: the document's rows, zeros on the
    extra rows (so that they pass no gradient)."""
    return _fill(torch.empty_like(out), _rows(do, sample, start, length))


def _fill(block, rows):
    """``block`` with ``rows`` as its first rows and zeros after them."""
    block[:, :, :rows.shape[2]].copy_(rows)
    block[:, :, rows.shape[2]:].zero_()
    return block


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split, scale, engine):
        from bbm.kernels.op import forward_pass, kernel_inputs  # imported lazily: CPU users never load Triton
        q, k, v = (_dense(t) for t in (q, k, v))
        warm_up(q, k, v, split, scale, engine)
        streams = _Streams(q.device)
        pieces, states = [], []
        for i, span in enumerate(split.blocks):  # the blocks first, so the residual overlaps them
            with streams.on(i):
                o, state = engine.forward(*(_block(t, *span) for t in (q, k, v)), scale)
            pieces.append(o)
            states.append(state)
        residual = ()
        if split.residual is not None:
            kq, kk, kv, meta, tensors, _ = kernel_inputs(q, k, v, split.residual)
            ctx.busy = (split.busy_tiles(meta.block_m), split.busy_tiles(meta.block_n))
            out, lse = forward_pass(kq, kk, kv, tensors, scale, [], ctx.busy)
            residual = (out, kq, kk, kv, lse, *tensors)  # the Triton backward reads the whole output
        else:
            out = torch.empty_like(q)
        streams.join(*pieces)
        for span, o in zip(split.blocks, pieces):
            _rows(out, *span).copy_(o[:, :, :span[2]])
        ctx.split, ctx.scale, ctx.engine = split, scale, engine
        ctx.state_sizes = [len(s) for s in states]
        # each block keeps its own output (the layout its backward graph was built for)
        ctx.save_for_backward(q, k, v, *pieces, *[t for s in states for t in s], *residual)
        return out

    @staticmethod
    def backward(ctx, do):
        from bbm.kernels.op import backward_pass
        split = ctx.split
        q, k, v, *rest = ctx.saved_tensors
        pieces, rest = rest[:len(split.blocks)], rest[len(split.blocks):]
        states, at = [], 0
        for size in ctx.state_sizes:
            states.append(tuple(rest[at:at + size]))
            at += size
        streams = _Streams(q.device)
        grads = []
        for i, (span, o, state) in enumerate(zip(split.blocks, pieces, states)):
            with streams.on(i):
                grads.append(ctx.engine.backward(_block_grad(do, o, *span), *(_block(t, *span) for t in (q, k, v)),
                                                 o, state, ctx.scale))
        if split.residual is not None:
            out, kq, kk, kv, lse, *tensors = rest[at:]
            dq, dk, dv = backward_pass(do, kq, kk, kv, out, lse, tensors, ctx.scale, [], ctx.busy)
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        streams.join(*[g for gs in grads for g in gs])
        for span, gs in zip(split.blocks, grads):
            for full, part in zip((dq, dk, dv), gs):
                _rows(full, *span).copy_(part[:, :, :span[2]])
        return dq, dk, dv, None, None, None
