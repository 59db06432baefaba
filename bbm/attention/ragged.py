"""Causal document masks as one cuDNN call over ragged (variable-length) sequences.

A causal document mask is block diagonal, and when q, k and v hold each sample's tokens one after the other with
their heads interleaved ((B, N, H, D) memory, what a model's projections give before the head transpose), every
document is one run of memory. cuDNN's attention takes such runs as a batch of variable-length sequences: a
ragged offset per document into each tensor, its length under a padding mask, and a causal band. One forward and
one backward call cover every document of the micro-batch and read and write the model's own tensors; inputs in
another layout are first copied into this one (cuDNN's ragged kernels take no other).

cuDNN compiles a graph per shape: the number of documents (rounded up to a power of two; the extra documents are
empty) and the longest one (rounded up to a power of two). The first call for a layout (device, dtype, tokens,
heads, head dim, scale) builds the forward and backward graphs of every shape its micro-batches can take with
documents of at least ``SHORTEST`` tokens on average (``shapes``), so that training pays
for them once, up front, instead of in whichever step first meets a shape; rarer shapes are built when met.
Graphs are shared by all threads (the backward, and a checkpointed forward's recompute, run on the autograd
engine's thread) behind one lock. The softmax statistics the backward needs are ragged too: one float per token
and head.

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
_plans = weakref.WeakKeyDictionary()  # mask -> {batch: Documents}


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


def supports(q: torch.Tensor, mask: Optional[Mask]) -> bool:
    """Whether this path runs ``mask`` for queries like ``q``: a causal document mask without window or prefix."""
    return mask is not None and mask.plain_documents and mask.documents_causal and available(q)


def size_class(length: int) -> int:
    """The longest document's length rounded up to a power of two (at least ``SHORTEST``)."""
    return max(SHORTEST, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class Documents:
    """Every document of a micro-batch as a ragged batch, for inputs of ``batch`` samples of ``tokens`` tokens."""
    first: torch.Tensor  # int64 (count + 1,) on the device: flat token index of each document (longest first), then the end
    lengths: torch.Tensor  # int32 (count, 1, 1, 1) on the device; 0 for the padding documents
    count: int  # documents, rounded up to a power of two
    longest: int  # size_class of the longest document
    batch: int
    tokens: int
    _offsets: dict = field(default_factory=dict, compare=False)

    def offsets(self, width: int) -> torch.Tensor:
        """int32 (count + 1, 1, 1, 1): element offset of each document in a (B, N, H, D) tensor of ``width`` elements
        per token."""
        if width not in self._offsets:
            self._offsets[width] = (self.first * width).to(torch.int32).view(-1, 1, 1, 1)
        return self._offsets[width]


def plan(mask: Mask, batch: int) -> Optional[Documents]:
    """The documents of a causal document mask for inputs of ``batch`` samples (a mask shared by the batch repeats
    them per sample), or None if it is not one. Kept per mask; read from the mask's document spans on the host (no
    device sync for a mask built from host ids, see ``Mask.from_documents``): the document count and the longest
    length decide the graph's shape."""
    if mask is None or not mask.plain_documents or not mask.documents_causal:
        return None
    plans = _plans.setdefault(mask, {})
    if batch not in plans:
        n = mask.n_q
        first, length = mask.document_spans()
        if mask.batch < batch:  # a mask shared by the batch: its documents once per sample
            first = (first + n * torch.arange(batch).unsqueeze(1)).flatten()
            length = length.repeat(batch)
        # longest first: cuDNN starts the documents' tiles in this order, and a long document's tiles started last
        # would leave most SMs idle at the end
        order = torch.from_numpy(np.argsort(-length.numpy(), kind="stable"))
        first, length = first[order], length[order]
        count = 1 << (first.numel() - 1).bit_length()
        pad = count - first.numel()  # padding documents start at the end, empty
        first = torch.cat([first, first.new_full((pad + 1,), batch * n)])
        lengths = torch.cat([length, length.new_zeros(pad)]).to(torch.int32).view(-1, 1, 1, 1)
        plans[batch] = Documents(to_device(first, mask.device), to_device(lengths, mask.device), count,
                                 size_class(int(length.max())), batch, n)
    return plans[batch]


def _handle(device):
    """The device's cuDNN handle, set to run on the current stream (call with ``_lock`` held)."""
    cudnn = frontend()
    if device not in _handles:
        with torch.cuda.device(device):
            _handles[device] = cudnn.create_handle()
    cudnn.set_stream(handle=_handles[device], stream=torch.cuda.current_stream(device).cuda_stream)
    return _handles[device]


class _Graph:
    """One built cuDNN graph and its tensor handles by name: the data tensors (q, k, v, o, do, dq, dk, dv), the
    softmax statistics (stats), each one's ragged offsets (``at_`` + name) and the document lengths (len_q,
    len_kv). ``width[name]`` is a tensor's elements per token."""

    def __init__(self, backward: bool, count: int, longest: int, total: int, hq: int, hkv: int, d: int, dtype,
                 scale: float, deterministic: bool, device):
        cudnn = frontend()
        kind = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
        int32, float32 = cudnn.data_type.INT32, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=kind, intermediate_data_type=float32, compute_data_type=float32,
                          handle=_handle(device))
        heads = {"q": hq, "k": hkv, "v": hkv, "o": hq, "do": hq, "dq": hq, "dk": hkv, "dv": hkv, "stats": hq}
        self.width = {name: h * (1 if name == "stats" else d) for name, h in heads.items()}
        self.t = {}

        def layout(name):  # (count, heads, longest, dim) over the tokens; offsets place each document
            h, dim = heads[name], 1 if name == "stats" else d
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
                    diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
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

    def run(self, device, docs: Documents, **tensors):
        """Executes the graph on the current stream; ``tensors`` by name."""
        feed = {self.t[name]: t for name, t in tensors.items()}
        feed.update({self.t["at_" + name]: docs.offsets(self.width[name]) for name in tensors})
        feed[self.t["len_q"]] = feed[self.t["len_kv"]] = docs.lengths
        workspace = torch.empty(self.workspace, dtype=torch.uint8, device=device)
        self.graph.execute(feed, workspace, handle=_handle(device))


def shapes(total: int, tokens: int):
    """The (count, longest) graph shapes of micro-batches of ``total`` tokens in samples of ``tokens`` whose
    documents average at least ``SHORTEST`` tokens: count * longest >= total, longest <= a sample."""
    counts = [1 << i for i in range(max(1, total // SHORTEST).bit_length() + 1)]  # up to the next power of two
    most = 1 << (max(1, total // SHORTEST) - 1).bit_length()
    longest = [1 << i for i in range(SHORTEST.bit_length() - 1, size_class(tokens).bit_length())]
    return [(count, size) for size in longest for count in counts if count <= most and count * size >= total]


def _run(backward: bool, docs: Documents, scale: float, **tensors):
    """Runs the forward or backward graph of ``docs``' shape on ``tensors`` by name; the first call for a layout
    builds the graphs of all its common shapes."""
    q, k = tensors["q"], tensors["k"]
    total = docs.batch * docs.tokens
    deterministic = torch.are_deterministic_algorithms_enabled()
    layout = (q.device, q.dtype, total, q.shape[1], k.shape[1], q.shape[3], scale, deterministic)
    build = lambda backward, count, longest: _Graph(backward, count, longest, total, q.shape[1], k.shape[1],
                                                     q.shape[3], q.dtype, scale, deterministic, q.device)
    with _lock:
        if layout not in _graphs:
            _graphs[layout] = {(b, c, l): build(b, c, l) for c, l in shapes(total, docs.tokens) for b in (False, True)}
        graphs = _graphs[layout]
        if (backward, docs.count, docs.longest) not in graphs:
            graphs[backward, docs.count, docs.longest] = build(backward, docs.count, docs.longest)
        graphs[backward, docs.count, docs.longest].run(q.device, docs, **tensors)


def _empty_token_major(t):
    b, h, n, d = t.shape
    return torch.empty(b, n, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)


def _as_token_major(t):
    """``t`` itself if in (B, N, H, D) memory, else such a copy (differentiable: the gradient flows back to ``t``)."""
    return t if token_major(t) else _empty_token_major(t).copy_(t)


class _RaggedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, docs: Documents, scale: float):
        out = _empty_token_major(q)
        stats = torch.empty(docs.batch * docs.tokens, q.shape[1], dtype=torch.float32, device=q.device)
        _run(False, docs, scale, q=q, k=k, v=v, o=out, stats=stats)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.docs, ctx.scale = docs, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, stats = ctx.saved_tensors
        dq, dk, dv = _empty_token_major(q), _empty_token_major(k), _empty_token_major(v)
        _run(True, ctx.docs, ctx.scale, q=q, k=k, v=v, o=out, do=_as_token_major(do), stats=stats, dq=dq, dk=dk, dv=dv)
        return dq, dk, dv, None, None


def ragged_attention(q, k, v, docs: Documents, scale: float) -> torch.Tensor:
    """Attention of validated q (B, Hq, N, D), k/v (B, Hkv, N, D) within each document of ``docs``, causally; the
    output lies in (B, N, H, D) memory."""
    return _RaggedAttention.apply(_as_token_major(q), _as_token_major(k), _as_token_major(v), docs, float(scale))
