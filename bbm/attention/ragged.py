"""Document masks on cuDNN: every document of a micro-batch in one call over ragged (variable-length) sequences.

A document mask is block diagonal, and when q, k and v hold each sample's tokens one after the other with their
heads interleaved ((B, N, H, D) memory, what a model's projections give before the head transpose), every document
is one run of memory. cuDNN's attention takes such runs as a batch of variable-length sequences: a ragged offset
per run into each tensor, its length under a padding mask, and a diagonal band. One forward and one backward call
cover every document of the micro-batch and read and write the model's own tensors; inputs in another layout are
first copied into this one (cuDNN's ragged kernels take no other). What a call runs (``Call``):

* causal documents: each document's queries over its keys, the band's right bound at the diagonal (top-left);
* with a window of W: the band's left bound W positions to the left of the diagonal;
* bidirectional documents: no band;
* a per-document bidirectional prefix of P tokens (prefix-LM): two calls on disjoint query rows, the prefix's
  queries over the prefix's keys (no band) and the other queries over the whole document, causally with the
  diagonal aligned bottom-right (query P + i sees keys up to P + i). Their outputs fill disjoint rows; their key
  and value gradients add up.

cuDNN compiles a graph per shape: the number of runs (rounded up to a power of two; the extra runs are empty) and
the longest query and key runs (rounded up to powers of two). The first call for a layout (device, dtype, tokens,
heads, head dim, scale, band) builds the forward and backward graphs of every shape that micro-batches of causal
documents averaging at least ``SHORTEST`` tokens can take (``shapes``), so that training pays for them once, up
front, instead of in whichever step first meets a shape; rarer shapes are built when met. Graphs are shared by all
threads (the backward, and a checkpointed forward's recompute, run on the autograd engine's thread) behind one
lock. The softmax statistics the backward needs are ragged too: one float per token and head.

Needs NVIDIA's cudnn-frontend Python package (``pip install nvidia-cudnn-frontend``), which drives the cuDNN
library that PyTorch ships.
"""
import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bbm._checks import cudnn_takes
from bbm._tensors import to_device
from bbm.masks import Mask

SHORTEST = 64  # the longest-document size classes start here
_lock = threading.Lock()  # held while building or running a graph: a cuDNN handle serves one thread at a time
_handles, _graphs = {}, {}  # cuDNN handles by device, built graphs by layout and shape
_plans = weakref.WeakKeyDictionary()  # mask -> {batch: its calls}


@functools.cache
def _import_frontend():
    """(cudnn-frontend's module or None, why not)."""
    try:
        import cudnn
    except ImportError:
        return None, "cudnn-frontend not installed (pip install nvidia-cudnn-frontend)"
    except OSError as e:
        return None, f"cudnn-frontend installed but it finds no cuDNN library ({e})"
    return cudnn, ""


def frontend():
    """cudnn-frontend's module, or None where it is not installed or finds no cuDNN library."""
    return _import_frontend()[0]


def unavailable_reason() -> str:
    """Why ``frontend()`` is None ("" when it is not)."""
    return _import_frontend()[1]


def token_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (B, H, N, D) lies in (B, N, H, D) memory order, tokens then heads then dims, densely."""
    b, h, n, d = t.shape
    return (t.stride(3) == 1 and (h == 1 or t.stride(1) == d) and (n == 1 or t.stride(2) == h * d)
            and (b == 1 or t.stride(0) == n * h * d))


def available(q: torch.Tensor) -> bool:
    """Whether cuDNN's ragged attention takes queries like ``q``: ``cudnn_takes``, under 2**31 elements (32-bit
    offsets), cudnn-frontend installed."""
    return cudnn_takes(q) and q.numel() < 2 ** 31 and frontend() is not None


def describes(mask: Optional[Mask]) -> bool:
    """Whether ``mask`` is a document mask this path runs: causal or not, a window with causal documents, a prefix
    with causal documents and no window."""
    if mask is None or mask.documents is None:
        return False
    if mask.prefix is not None:
        return mask.documents_causal and mask.window is None
    return mask.window is None or mask.documents_causal


def supports(q: torch.Tensor, mask: Optional[Mask]) -> bool:
    """Whether this path runs ``mask`` for queries like ``q``."""
    return describes(mask) and available(q)


def size_class(length: int) -> int:
    """The longest document's length rounded up to a power of two (at least ``SHORTEST``)."""
    return max(SHORTEST, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class Call:
    """One cuDNN call: a ragged batch of runs, each a run of queries over a run of keys of one document, for inputs
    of ``batch`` samples of ``tokens`` tokens. The band: causal (the right bound at the diagonal, aligned top-left
    or, with ``bottom_right``, bottom-right), and ``window`` (the left bound), or no band."""
    q_first: torch.Tensor  # int64 (count + 1,) on the device: flat token index of each run's first query, then the end
    kv_first: torch.Tensor  # int64 (count + 1,): the same for keys
    len_q: torch.Tensor  # int32 (count, 1, 1, 1) on the device; 0 for the padding runs
    len_kv: torch.Tensor  # int32 (count, 1, 1, 1)
    count: int  # runs, rounded up to a power of two
    longest_q: int  # size_class of the longest query run
    longest_kv: int  # size_class of the longest key run
    causal: bool
    bottom_right: bool
    window: Optional[int]
    batch: int
    tokens: int
    _offsets: dict = field(default_factory=dict, compare=False)

    @property
    def band(self):
        """What decides a graph besides its shape."""
        return self.causal, self.bottom_right, self.window

    def offsets(self, width: int, keys: bool) -> torch.Tensor:
        """int32 (count + 1, 1, 1, 1): element offset of each run's first query (or key) in a (B, N, H, D) tensor of
        ``width`` elements per token."""
        if (width, keys) not in self._offsets:
            first = self.kv_first if keys else self.q_first
            self._offsets[width, keys] = (first * width).to(torch.int32).view(-1, 1, 1, 1)
        return self._offsets[width, keys]


def _call(q_first, kv_first, len_q, len_kv, batch, n, device, causal, bottom_right=False, window=None) -> Call:
    """A Call of the runs with a query (runs with none are left out), longest query run first: cuDNN starts the runs'
    tiles in this order, and a long run's tiles started last would leave most SMs idle at the end."""
    keep = len_q > 0
    q_first, kv_first, len_q, len_kv = q_first[keep], kv_first[keep], len_q[keep], len_kv[keep]
    order = torch.from_numpy(np.argsort(-len_q.numpy(), kind="stable"))
    q_first, kv_first, len_q, len_kv = q_first[order], kv_first[order], len_q[order], len_kv[order]
    count = 1 << (q_first.numel() - 1).bit_length()
    pad = count - q_first.numel()  # padding runs start at the end, empty
    end = q_first.new_full((pad + 1,), batch * n)
    lengths = lambda t: torch.cat([t, t.new_zeros(pad)]).to(torch.int32).view(-1, 1, 1, 1)
    return Call(to_device(torch.cat([q_first, end]), device), to_device(torch.cat([kv_first, end]), device),
                to_device(lengths(len_q), device), to_device(lengths(len_kv), device), count,
                size_class(int(len_q.max())), size_class(int(len_kv.max())), causal, bottom_right, window, batch, n)


def plan(mask: Mask, batch: int) -> Optional[tuple]:
    """The calls (a tuple of ``Call``; their query runs cover every token once) of a document mask (``describes``) for inputs of ``batch`` samples (a mask shared by the batch
    repeats its documents per sample), or None if this path does not run it. Kept per mask; read from the mask's
    document spans on the host (no device sync for a mask built from host ids, see ``Mask.from_documents``): the
    run count and the longest runs decide the graphs' shapes."""
    if not describes(mask):
        return None
    plans = _plans.setdefault(mask, {})
    if batch not in plans:
        n = mask.n_q
        first, length = mask.document_spans()
        prefix = mask.prefix_lengths()
        if mask.batch < batch:  # a mask shared by the batch: its documents once per sample
            first = (first + n * torch.arange(batch).unsqueeze(1)).flatten()
            length, prefix = length.repeat(batch), prefix.repeat(batch)
        causal = mask.documents_causal
        if mask.prefix is None:
            calls = (_call(first, first, length, length, batch, n, mask.device, causal, window=mask.window),)
        else:  # the prefix's queries over the prefix; the others over the whole document, bottom-right causal
            calls = (_call(first, first, prefix, prefix, batch, n, mask.device, False),
                     _call(first + prefix, first, length - prefix, length, batch, n, mask.device, True, True))
        plans[batch] = calls
    return plans[batch]


def _handle(device):
    """The device's cuDNN handle, set to run on the current stream (call with ``_lock`` held)."""
    cudnn = frontend()
    if device not in _handles:
        with torch.cuda.device(device):
            _handles[device] = cudnn.create_handle()
    cudnn.set_stream(handle=_handles[device], stream=torch.cuda.current_stream(device).cuda_stream)
    return _handles[device]


_Q_SIDE = ("q", "o", "do", "dq", "stats")  # tensors with a row per query; the others have one per key


class _Graph:
    """One built cuDNN graph and its tensor handles by name: the data tensors (q, k, v, o, do, dq, dk, dv), the
    softmax statistics (stats), each one's ragged offsets (``at_`` + name) and the run lengths (len_q, len_kv).
    ``width[name]`` is a tensor's elements per token."""

    def __init__(self, backward: bool, count: int, longest_q: int, longest_kv: int, band, total: int, hq: int,
                 hkv: int, d: int, dtype, scale: float, deterministic: bool, device):
        cudnn = frontend()
        kind = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
        int32, float32 = cudnn.data_type.INT32, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=kind, intermediate_data_type=float32, compute_data_type=float32,
                          handle=_handle(device))
        heads = {"q": hq, "k": hkv, "v": hkv, "o": hq, "do": hq, "dq": hq, "dk": hkv, "dv": hkv, "stats": hq}
        self.width = {name: h * (1 if name == "stats" else d) for name, h in heads.items()}
        self.t = {}

        def layout(name):  # (count, heads, longest, dim) over the tokens; offsets place each run
            h, dim = heads[name], 1 if name == "stats" else d
            longest = longest_q if name in _Q_SIDE else longest_kv
            self.t["at_" + name] = g.tensor(dim=[count + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int32,
                                            name="at_" + name)
            return dict(dim=[count, h, longest, dim], stride=[longest * h * dim, dim, h * dim, 1],
                        ragged_offset=self.t["at_" + name])

        def data(name, data_type=kind):
            self.t[name] = g.tensor(**layout(name), data_type=data_type, name=name)
            return self.t[name]

        def output(name, t, data_type=kind):
            shape = layout(name)
            t.set_output(True).set_dim(shape["dim"]).set_stride(shape["stride"])
            t.set_ragged_offset(shape["ragged_offset"]).set_data_type(data_type)
            self.t[name] = t

        for name in ("len_q", "len_kv"):
            self.t[name] = g.tensor(dim=[count, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int32, name=name)
        mask = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=self.t["len_q"], seq_len_kv=self.t["len_kv"],
                    **_band_arguments(cudnn, *band))
        q, k, v = data("q"), data("k"), data("v")
        if not backward:
            out, stats = g.sdpa(q=q, k=k, v=v, generate_stats=True, name="sdpa", **mask)
            output("o", out)
            output("stats", stats, float32)
        else:
            grads = g.sdpa_backward(q=q, k=k, v=v, o=data("o"), dO=data("do"), stats=data("stats", float32),
                                    max_total_seq_len_q=total, max_total_seq_len_kv=total,
                                    use_deterministic_algorithm=deterministic, name="sdpa_backward", **mask)
            for name, grad in zip(("dq", "dk", "dv"), grads):
                output(name, grad)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.workspace = g, g.get_workspace_size()

    def run(self, device, call: Call, **tensors):
        """Executes the graph on the current stream; ``tensors`` by name."""
        feed = {self.t[name]: t for name, t in tensors.items()}
        feed.update({self.t["at_" + name]: call.offsets(self.width[name], name not in _Q_SIDE) for name in tensors})
        feed[self.t["len_q"]], feed[self.t["len_kv"]] = call.len_q, call.len_kv
        workspace = torch.empty(self.workspace, dtype=torch.uint8, device=device)
        self.graph.execute(feed, workspace, handle=_handle(device))


def _band_arguments(cudnn, causal: bool, bottom_right: bool, window: Optional[int]) -> dict:
    """cuDNN's diagonal band of a call: causal, the right bound on the diagonal, which is aligned top-left (query i of
    a run sees key i) or bottom-right (the last query sees the last key); a window of W, the left bound W (a query
    sees itself and the W - 1 keys before it)."""
    if not causal:
        return {}
    alignment = cudnn.diagonal_alignment.BOTTOM_RIGHT if bottom_right else cudnn.diagonal_alignment.TOP_LEFT
    band = dict(diagonal_alignment=alignment, diagonal_band_right_bound=0)
    if window is not None:
        band["diagonal_band_left_bound"] = window
    return band


def shapes(total: int, tokens: int):
    """The (count, longest) graph shapes of micro-batches of ``total`` tokens in samples of ``tokens`` whose
    documents average at least ``SHORTEST`` tokens: count * longest >= total, longest <= a sample."""
    counts = [1 << i for i in range(max(1, total // SHORTEST).bit_length() + 1)]  # up to the next power of two
    most = 1 << (max(1, total // SHORTEST) - 1).bit_length()
    longest = [1 << i for i in range(SHORTEST.bit_length() - 1, size_class(tokens).bit_length())]
    return [(count, size) for size in longest for count in counts if count <= most and count * size >= total]


def _run(backward: bool, call: Call, scale: float, **tensors):
    """Runs the forward or backward graph of ``call``'s shape and band on ``tensors`` by name; the first call for a
    layout of documents (query and key runs alike) builds the graphs of all its common shapes."""
    q, k = tensors["q"], tensors["k"]
    total = call.batch * call.tokens
    deterministic = torch.are_deterministic_algorithms_enabled()
    layout = (q.device, q.dtype, total, q.shape[1], k.shape[1], q.shape[3], scale, deterministic, call.band)
    build = lambda backward, count, lq, lkv: _Graph(backward, count, lq, lkv, call.band, total, q.shape[1],
                                                    k.shape[1], q.shape[3], q.dtype, scale, deterministic, q.device)
    key = (backward, call.count, call.longest_q, call.longest_kv)
    with _lock:
        if layout not in _graphs:
            common = shapes(total, call.tokens) if not call.bottom_right else []
            _graphs[layout] = {(b, c, n, n): build(b, c, n, n) for c, n in common for b in (False, True)}
        graphs = _graphs[layout]
        if key not in graphs:
            graphs[key] = build(*key)
        graphs[key].run(q.device, call, **tensors)


def _empty_token_major(t):
    b, h, n, d = t.shape
    return torch.empty(b, n, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)


def _as_token_major(t):
    """``t`` itself if in (B, N, H, D) memory, else such a copy (differentiable: the gradient flows back to ``t``)."""
    return t if token_major(t) else _empty_token_major(t).copy_(t)


class _RaggedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, calls: tuple, scale: float):
        out = _empty_token_major(q)
        stats = torch.empty(q.shape[0] * q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        for call in calls:  # disjoint query rows
            _run(False, call, scale, q=q, k=k, v=v, o=out, stats=stats)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.calls, ctx.scale = calls, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, stats = ctx.saved_tensors
        do = _as_token_major(do)
        dq = _empty_token_major(q)
        if len(ctx.calls) == 1:  # every key in the call: it writes all of dk and dv
            dk, dv = _empty_token_major(k), _empty_token_major(v)
            _run(True, ctx.calls[0], ctx.scale, q=q, k=k, v=v, o=out, do=do, stats=stats, dq=dq, dk=dk, dv=dv)
            return dq, dk, dv, None, None
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for call in ctx.calls:  # each call writes the keys of its runs: zeros elsewhere, then the calls add up
            dk_call, dv_call = _empty_token_major(k).zero_(), _empty_token_major(v).zero_()
            _run(True, call, ctx.scale, q=q, k=k, v=v, o=out, do=do, stats=stats, dq=dq, dk=dk_call, dv=dv_call)
            dk += dk_call
            dv += dv_call
        return dq, dk, dv, None, None


def ragged_attention(q, k, v, calls: tuple, scale: float) -> torch.Tensor:
    """Attention of validated q (B, Hq, N, D), k/v (B, Hkv, N, D) under the runs of ``calls`` (``plan``); the output
    lies in (B, N, H, D) memory."""
    return _RaggedAttention.apply(_as_token_major(q), _as_token_major(k), _as_token_major(v), calls, float(scale))
