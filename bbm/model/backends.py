"""Attention backends of the model, behind one call: ``attend(q, k, v, batch_mask)``.

A ``BatchMask`` is built once per micro-batch from its document ids and shared by every layer:
  * ``bbm``         -> ``bbm.Mask.from_documents`` (O(N) ranges; what the attention paths derive is kept per mask)
  * ``flex``        -> a FlexAttention ``BlockMask`` with a document-causal ``mask_mod``
  * ``sdpa_masked`` -> a dense boolean ``(B, 1, N, N)`` mask for SDPA
  * ``sdpa_causal`` -> nothing: plain causal attention that ignores documents (speed comparison only)
Every backend keeps the bbm ``Mask`` of the pairs it computes, for FLOP counting and density.
A sequence-parallel wrapper replaces ``attend`` (see ``Decoder.attention_fn``).
"""
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

import bbm
from bbm._checks import check_tensor, fail
from bbm.model.config import ATTENTION_BACKENDS

_warned_causal = False
_compiled_flex = None


@dataclass
class BatchMask:
    backend: str
    batch: int  # samples in the micro-batch
    mask: bbm.Mask  # the pairs this backend attends to (documents, or plain causal for sdpa_causal)
    block_mask: Any = None  # flex: torch BlockMask
    dense: Optional[torch.Tensor] = None  # sdpa_masked: bool (B, 1, N, N)
    biases: dict = field(default_factory=dict)  # sdpa_masked: additive float mask per dtype, shared by all layers
    bbm_backend: str = "auto"  # bbm: bbm.attention's backend=

    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs summed over the micro-batch, per head (no device sync for a mask built from
        the host's document ids, see ``bbm.Mask.allowed_pairs``)."""
        return self.mask.allowed_pairs() * (self.batch // self.mask.batch)

    @property
    def density(self) -> float:
        return self.mask.density


def build_mask(doc_ids, backend: str, bbm_backend: str = "auto", check: bool = True, device=None) -> BatchMask:
    """The attention mask of one micro-batch: ``doc_ids`` int ``(B, N)``, a run of equal ids is one document.
    ``bbm_backend`` is the path ``bbm.attention`` takes for backend ``bbm``. ``check`` verifies that each id is
    one run (a device sync; the packed loader's ids are by construction). ``device``: where the mask lives
    (default: the ids'); host ids with a GPU ``device`` spare bbm's document plans a device sync."""
    check_tensor("doc_ids", doc_ids, ndim=2, dtype_kind="int")
    if backend not in ATTENTION_BACKENDS:
        fail("backend", f"one of {ATTENTION_BACKENDS}", repr(backend))
    b, n = doc_ids.shape
    if backend == "sdpa_causal":
        _warn_causal_once()
        return BatchMask(backend, b, bbm.Mask.causal(n, device=device or doc_ids.device))
    mask = bbm.Mask.from_documents(doc_ids, check=check, device=device)
    if backend == "bbm":
        return BatchMask(backend, b, mask, bbm_backend=bbm_backend)
    if backend == "sdpa_masked":
        return BatchMask(backend, b, mask, dense=mask.to_dense())
    return BatchMask(backend, b, mask, block_mask=_flex_block_mask(mask.documents))


def _warn_causal_once():
    global _warned_causal
    if not _warned_causal:
        warnings.warn("attention backend 'sdpa_causal' ignores document boundaries: tokens attend across "
                      "documents. Use it for speed comparison only.", stacklevel=3)
        _warned_causal = True


def _flex_block_mask(doc_ids):
    from torch.nn.attention.flex_attention import create_block_mask
    b, n = doc_ids.shape

    def document_causal(bi, h, q, k):  # evaluated per element inside FlexAttention's partial blocks
        return (doc_ids[bi, q] == doc_ids[bi, k]) & (q >= k)

    return create_block_mask(document_causal, b, None, n, n, device=doc_ids.device, _compile=doc_ids.is_cuda)


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention
    if q.is_cuda:  # the fused kernel needs torch.compile; eager (CPU, forward only) materialises the scores
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _additive_mask(batch_mask: BatchMask, dtype):
    """0 / -inf float mask, made once per micro-batch: SDPA converts a bool mask (and keeps the copy for
    backward) in every layer, N^2 bytes each."""
    if dtype not in batch_mask.biases:
        zero = torch.zeros((), dtype=dtype, device=batch_mask.dense.device)
        batch_mask.biases[dtype] = torch.where(batch_mask.dense, zero, float("-inf"))
    return batch_mask.biases[dtype]


def attend(q, k, v, batch_mask: BatchMask):
    """Attention of q ``(B, Hq, N, D)`` over k, v ``(B, Hkv, N, D)`` restricted by the micro-batch's mask."""
    backend = batch_mask.backend
    if backend == "bbm":
        return bbm.attention(q, k, v, batch_mask.mask, backend=batch_mask.bbm_backend)
    if backend == "flex":
        return _flex(q, k, v, batch_mask.block_mask)
    if backend == "sdpa_masked":  # kv heads repeated: SDPA's memory-efficient kernel takes a mask but no GQA
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(batch_mask, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
