"""``bbm.attention(q, k, v, mask)``: validation and the choice of a path; the paths do the work.

``backend="auto"`` takes the fastest exact path for the inputs and the mask:
  * no mask, or an exactly causal one (also a document mask with one document per sample), on CUDA ->
    ``sdpa`` (PyTorch's SDPA, its cuDNN kernel first);
  * any structured mask (ranges: documents, windows, prefixes, global tokens, ...) where FlashAttention-4 is
    installed (``bbm[hopper]``) on a Hopper GPU -> ``fa4`` (documents, windows and prefixes on FA4's own causal and
    window kernels, the others on its block-sparse kernels driven by bbm's tile lists);
  * a document mask (causal or not; with a window or a bidirectional prefix on causal documents), where
    cudnn-frontend takes the inputs -> ``ragged`` (every document in one cuDNN call over ragged sequences, two
    calls for a prefix);
  * any other mask on CUDA, and calls inside ``torch.compile``d code -> ``triton`` (bbm's block-sparse kernels);
  * CPU tensors -> ``reference`` (an exact PyTorch loop over the same tile metadata).
``backend="fa4"`` runs any structured mask on FlashAttention-4's Hopper kernels (``bbm.attention.fa4``, where
``flash_attn.cute`` is installed). Each path keeps what it derives from a mask (its plan) itself; the Mask is never written.
"""
import math
from typing import Optional

import torch

from bbm._checks import check_tensor, fail
from bbm.attention import fa4, ragged, sdpa
from bbm.attention.reference import reference_attention
from bbm.backends import BACKENDS
from bbm.masks import Mask


def _check_shapes(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtype_kind="float")
    b, hq, n_q, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b:
            fail(name, f"batch {b} like q", t.shape[0])
        if t.shape[-1] != d:
            fail(name, f"head dim {d} like q", t.shape[-1])
        if t.dtype != q.dtype:
            fail(name, f"dtype {q.dtype} like q", t.dtype, TypeError)
        if t.device != q.device:
            fail(name, f"device {q.device} like q", t.device)
    if v.shape != k.shape:
        fail("v", f"shape {tuple(k.shape)} like k", f"shape {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        fail("q/k heads", "Hq divisible by Hkv", f"Hq={hq}, Hkv={hkv}")
    if min(n_q, k.shape[2], d) == 0:
        fail("q/k", "non-empty sequence and head dims", f"q {tuple(q.shape)}, k {tuple(k.shape)}")


def _validate(q, k, v, mask, scale, backend):
    _check_shapes(q, k, v)
    if mask is not None:
        if not isinstance(mask, Mask):
            fail("mask", "a bbm.Mask or None (build one with bbm.Mask.from_dense / from_documents / ...)",
                 type(mask).__name__, TypeError)
        mask.check_against(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if mask.device != q.device:
            fail("mask", f"device {q.device} like q", mask.device)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale) or scale <= 0):
        fail("scale", "a finite positive float or None", repr(scale))
    if backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", repr(backend))
    if backend == "ragged":
        if not ragged.available(q):
            why = ragged.unavailable_reason() or "inputs it takes: CUDA, fp16/bf16, head dim a multiple of 8 up to 128"
            fail("backend", f"'ragged' where cuDNN's ragged attention runs ({why})",
                 f"q on {q.device}, {q.dtype}, head dim {q.shape[-1]}")
        if not ragged.supports(q, mask):
            fail("mask", "for backend='ragged', a Mask.from_documents mask (a window or a prefix only with causal=True, "
                 "not both)", repr(mask))
    if backend == "fa4" and not fa4.supports(q, mask):
        fail("backend", "'fa4' where FlashAttention-4's Hopper kernels run (flash_attn.cute installed, a compute "
             "capability 9 GPU, fp16/bf16, head dim 64 or 128) on a structured mask (ranges, not reordered)",
             f"q on {q.device}, {q.dtype}, head dim {q.shape[-1]}, mask {mask!r}")
    if backend == "triton" and not q.is_cuda:
        from bbm.attention.triton import available  # imported lazily: CPU users never load Triton kernels
        if not available(q):
            fail("backend", "'triton' on CUDA tensors (or TRITON_INTERPRET=1 set before the first import of bbm, to "
                 "run the kernels in Triton's CPU interpreter)", f"'triton' on {q.device} tensors")


def choose_backend(q, mask: Optional[Mask]) -> str:
    """What ``backend="auto"`` runs for these inputs."""
    if not q.is_cuda:
        return "reference"
    if torch.compiler.is_compiling():  # the plans below read the document list on the host
        return "sdpa" if mask is None or mask.is_causal else "triton"
    if sdpa.supports(mask):
        return "sdpa"
    if fa4.supports(q, mask):  # measured faster than cuDNN and the Triton kernels on the H100 (docs/benchmarks.md)
        return "fa4"
    if ragged.supports(q, mask):
        return "ragged"
    return "triton"


def plan(q, mask: Optional[Mask], backend: str = "auto") -> str:
    """Builds what ``attention(q, ..., mask, backend=backend)`` will need (tile lists, the ragged plan), e.g. once
    per micro-batch before the layers; -> the backend that runs."""
    backend = choose_backend(q, mask) if backend == "auto" else backend
    if backend == "ragged":
        ragged.plan(mask, q.shape[0])
    if backend == "fa4":
        fa4.plan(mask, q.shape[0])
    if backend == "triton" and mask is not None:
        from bbm.attention.triton.tuning import META_TILE  # imported lazily: CPU users never load Triton
        mask.tile_meta(*META_TILE)
    return backend


def attention(q, k, v, mask: Optional[Mask] = None, *, scale: Optional[float] = None,
              backend: str = "auto") -> torch.Tensor:
    """Softmax attention restricted to the pairs ``mask`` allows.

    q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA). ``mask=None`` is
    full attention. ``scale`` defaults to ``1/sqrt(D)``. A query with no allowed key outputs zeros and
    gets zero gradient; NaN and Inf in the inputs propagate as in SDPA. ``backend`` forces a path ("sdpa",
    "ragged", "fa4", "triton", "reference"); "auto" picks the fastest exact one (see this module's docstring). q, k and
    v in (B, N, H, D) memory (``q = x.view(B, N, H, D).transpose(1, 2)``, what a model's projections give) save
    the ragged path a copy. Differentiable in q, k and v."""
    _validate(q, k, v, mask, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        backend = choose_backend(q, mask)
    if mask is not None and mask.perm is not None:  # work in the reordered token order, then undo it
        q, k, v = (t.index_select(2, mask.perm) for t in (q, k, v))
    if backend == "sdpa":
        out = sdpa.run(q, k, v, mask, scale)
    elif backend == "fa4":
        out = fa4.fa4_attention(q, k, v, mask, scale)
    elif backend == "ragged":
        if mask.plain_documents and mask.documents_causal:  # micro-batches of one document per sample go to SDPA
            sdpa.warm_causal(q, k, v, scale)
        out = ragged.ragged_attention(q, k, v, ragged.plan(mask, q.shape[0]), scale)
    else:
        if mask is None:
            mask = _full(q.shape[2], k.shape[2], q.device)
        if backend == "reference":
            out = reference_attention(q, k, v, mask, scale)
        else:
            from bbm.attention.triton import flash_attention  # imported lazily: CPU users never load Triton
            out = flash_attention(q, k, v, mask, scale)
    if mask is not None and mask.perm is not None:
        out = out.index_select(2, torch.argsort(mask.perm))
    return out.to(q.dtype)


def _full(n_q: int, n_k: int, device) -> Mask:
    lo = torch.zeros(1, n_q, dtype=torch.int32, device=device)
    return Mask.from_ranges(lo, torch.full_like(lo, n_k), n_k=n_k)
