"""The public entry point: ``bbm.attention(q, k, v, mask)``.

Validates, applies a mask's token reordering, and dispatches:
  * full or exactly causal masks on CUDA -> PyTorch SDPA (its fastest backend);
  * causal document masks, with cudnn-frontend installed -> every document in one cuDNN call over ragged
    sequences (``bbm.ragged``);
  * else causal document masks with a long document, where cuDNN takes the inputs -> the document split
    (``bbm.split``: long documents on PyTorch's cuDNN attention, the rest on the Triton kernels);
  * other masks on CUDA -> the Triton block-sparse kernels;
  * CPU tensors -> the exact PyTorch reference that walks the same tile metadata.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bbm._checks import check_tensor, fail
from bbm import ragged, split
from bbm.backends import BACKENDS
from bbm.masks import Mask
from bbm.reference import reference_attention


def _validate(q, k, v, mask, scale, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtype_kind="float")
    b, hq, n_q, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        fail("k/v", f"batch {b} like q", f"k batch {k.shape[0]}, v batch {v.shape[0]}")
    if k.shape != v.shape:
        fail("v", f"shape {tuple(k.shape)} like k", f"shape {tuple(v.shape)}")
    if k.shape[-1] != d:
        fail("k", f"head dim {d} like q", k.shape[-1])
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        fail("q/k heads", "Hq divisible by Hkv", f"Hq={hq}, Hkv={hkv}")
    if min(n_q, k.shape[2], d) == 0:
        fail("q/k", "non-empty sequence and head dims", f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            fail(name, f"dtype {q.dtype} like q", t.dtype, TypeError)
        if t.device != q.device:
            fail(name, f"device {q.device} like q", t.device)
    if mask is not None:
        if not isinstance(mask, Mask):
            fail("mask", "a bbm.Mask or None (build one with bbm.Mask.from_dense / from_documents / ...)",
                 type(mask).__name__, TypeError)
        mask.check_against(b, hq, n_q, k.shape[2])
        if mask.device != q.device:
            fail("mask", f"device {q.device} like q", mask.device)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        fail("scale", "a positive float or None", repr(scale))
    if backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", repr(backend))
    if backend == "split" and not split.supported(q):
        fail("q", "inputs cuDNN attention takes, for backend='split' (CUDA, fp16/bf16, head dim a multiple of 8 "
             "up to 128, deterministic algorithms off)", f"{q.device}, {q.dtype}, head dim {d}")
    if backend == "ragged" and not ragged.supported(q):
        fail("q", "inputs cuDNN's ragged attention takes, for backend='ragged' (cudnn-frontend installed, CUDA, "
             "fp16/bf16, head dim a multiple of 8 up to 128)",
             f"{q.device}, {q.dtype}, head dim {d}, cudnn-frontend {'found' if ragged.frontend() else 'not installed'}")
    if backend in ("split", "ragged") and (mask is None or mask.documents is None or not mask.documents_causal):
        fail("mask", f"for backend={backend!r}, a causal Mask.from_documents mask (no window or prefix)", repr(mask))


# SDPA backends, fastest first on Hopper (cuDNN); each passes inputs it rejects to the next one
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]
_warm_layouts = set()  # the (shape, strides, ...) keys of the inputs _warm_causal has run for


def _sdpa(q, k, v, causal: bool, scale: float):
    with sdpa_kernel(_SDPA_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def _warm_causal(q, k, v, scale):
    """Runs SDPA's causal attention forward and backward once per layout of document-mask inputs: a micro-batch
    of one document per sample goes there (see ``choose_backend``), and cuDNN builds its graphs on a shape's first
    call (tens of ms), which a training run then pays up front, with the ragged graphs, not in some later step."""
    if not any(t.requires_grad for t in (q, k, v)) or torch.are_deterministic_algorithms_enabled():
        return  # no backward to prepare (inference), or none SDPA can run deterministically
    key = (q.shape, q.stride(), k.shape, k.stride(), q.dtype, q.device, scale)
    if key in _warm_layouts:
        return
    _warm_layouts.add(key)
    # its own graph, with hooks of its own: an activation checkpoint's forward must not record what it saves (the
    # recompute runs no warm-up, and would find the saved tensors differ)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the same strides, apart from the graph
        out = _sdpa(*leaves, True, scale)
        out.backward(out.detach())


def _triton(q, k, v, mask, scale):
    from bbm.kernels import flash_attention  # imported lazily: CPU users never load Triton kernels
    return flash_attention(q, k, v, mask, scale)


def choose_backend(q, mask: Optional[Mask]) -> str:
    """What ``backend="auto"`` runs for these inputs."""
    if not q.is_cuda:
        return "reference"
    if mask is None or mask.exactly_causal:
        return "sdpa"
    if torch.compiler.is_compiling():  # the document plans read the document list on the host
        return "triton"
    if ragged.supported(q) and ragged.plan(mask, q.shape[0]) is not None:
        return "sdpa" if mask.exactly_causal else "ragged"  # the plan finds a mask of one document per sample
    if split.supported(q) and split.plan_for(q, mask) is not None:
        return "split"
    return "triton"


def prepare(q, mask: Optional[Mask], backend: str = "auto") -> str:
    """Build and cache on ``mask`` what ``attention(q, ..., mask, backend=backend)`` will need (tile lists, the
    document split), e.g. once per micro-batch before the layers; -> the backend that runs."""
    backend = choose_backend(q, mask) if backend == "auto" else backend
    tiled = mask if backend == "triton" else None
    if backend == "split":
        plan = split.plan_for(q, mask)
        tiled = mask if plan is None else plan.residual
    if backend == "ragged":
        ragged.plan(mask, q.shape[0])
    if tiled is not None:
        from bbm.kernels.tuning import META_TILE  # imported lazily: CPU users never load Triton
        tiled.block_meta(*META_TILE)
    return backend


def attention(q, k, v, mask: Optional[Mask] = None, *, scale: Optional[float] = None,
              backend: str = "auto") -> torch.Tensor:
    """Softmax attention restricted to the pairs ``mask`` allows.

    q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA). ``mask=None`` is
    full attention. ``scale`` defaults to ``1/sqrt(D)``. A query with no allowed key outputs zeros and
    gets zero gradient. ``backend`` forces a path ("sdpa", "split", "ragged", "triton", "reference"); "auto" picks the
    fastest exact one. "split" (CUDA) runs the long documents of a causal document mask as cuDNN attention and
    the rest on the Triton kernels (see ``bbm.split``); without a long document it is "triton". "ragged" (CUDA,
    cudnn-frontend installed) runs every document of a causal document mask in one cuDNN call (see
    ``bbm.ragged``); q, k and v in (B, N, H, D) memory (``q = x.view(B, N, H, D).transpose(1, 2)``) save it a copy.
    Differentiable in q, k and v."""
    _validate(q, k, v, mask, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        backend = choose_backend(q, mask)
    if mask is not None and mask.perm is not None:  # work in the reordered token order, then undo it
        perm = mask.perm
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    if backend == "sdpa":
        if mask is None:
            out = _sdpa(q, k, v, False, scale)
        elif mask.exactly_causal:
            out = _sdpa(q, k, v, True, scale)
        else:
            dense = mask.dense if mask.dense is not None else mask.to_dense()
            out = _masked_sdpa(q, k, v, dense, scale)
    elif backend == "split" and (plan := split.plan_for(q, mask)) is not None:
        out = split.split_attention(q, k, v, plan, scale)
    elif backend == "ragged":
        _warm_causal(q, k, v, scale)
        out = ragged.ragged_attention(q, k, v, ragged.plan(mask, q.shape[0]), scale)
    else:  # triton, reference, or a split with no document long enough for a block
        if mask is None:
            mask = Mask.from_ranges(*_full_bounds(q.shape[0], q.shape[2], k.shape[2], q.device), n_k=k.shape[2])
        fn = reference_attention if backend == "reference" else _triton
        out = fn(q, k, v, mask, scale)
    if mask is not None and mask.perm is not None:
        out = out.index_select(2, torch.argsort(mask.perm))
    return out.to(q.dtype)


def _full_bounds(b, n_q, n_k, device):
    lo = torch.zeros(1, n_q, dtype=torch.int32, device=device)
    return lo, torch.full_like(lo, n_k)


def _masked_sdpa(q, k, v, allowed, scale):
    """SDPA with a dense bool mask. Rows with no allowed key (NaN in SDPA) attend to key 0 and are then
    zeroed, so they output zeros and pass no gradient."""
    has_key = allowed.any(-1, keepdim=True)
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    allowed = allowed | (first & ~has_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
