"""Attention backends of the model, behind one call: ``attend(q, k, v, layer_mask)``.

A ``BatchMask`` is built once per micro-batch from its document ids and shared by every layer; it holds one
``LayerMask`` per distinct attention window of the layers (``ModelConfig.layer_windows``: e.g. local layers with a
1024-token window between global ones), each in its backend's form:
  * ``bbm``         -> ``bbm.Mask.from_documents`` (O(N) ranges; what the attention paths derive is kept per mask)
  * ``flex``        -> a FlexAttention ``BlockMask`` whose ``mask_mod`` states the same mask
  * ``sdpa_masked`` -> a dense boolean ``(B, 1, N, N)`` mask for SDPA
  * ``sdpa_causal`` -> nothing: plain causal attention that ignores documents, windows and prefixes (speed
    comparison only)
Documents may start with a bidirectional prefix (``prefix_fraction``: prefix-LM); the labels that such a prefix
would leak are hidden by ``BatchMask.hide_prefix_labels``. Every backend keeps the bbm ``Mask`` of the pairs it
computes, for FLOP counting and density. A sequence-parallel wrapper replaces ``attend`` (see
``Decoder.attention_fn``).
"""
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

import bbm
from bbm._checks import check_tensor, fail
from bbm.data import IGNORE_INDEX
from bbm.masks.documents import document_prefix
from bbm.model.config import ATTENTION_BACKENDS

_warned_causal = False
_compiled_flex = None


@dataclass
class LayerMask:
    """The mask of the layers with one window, in the form ``attend`` gives its backend."""
    backend: str
    batch: int  # samples in the micro-batch
    mask: bbm.Mask  # the pairs this backend attends to
    block_mask: Any = None  # flex: torch BlockMask
    dense: Optional[torch.Tensor] = None  # sdpa_masked: bool (B, 1, N, N)
    biases: dict = field(default_factory=dict)  # sdpa_masked: additive float mask per dtype, shared by its layers
    bbm_backend: str = "auto"  # bbm: bbm.attention's backend=

    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs summed over the micro-batch, per head (no device sync for a mask built from
        the host's document ids, see ``bbm.Mask.allowed_pairs``)."""
        return self.mask.allowed_pairs() * (self.batch // self.mask.batch)


@dataclass
class BatchMask:
    """A micro-batch's masks: ``layer(i)`` is layer i's."""
    by_window: dict  # window (None: the whole document) -> LayerMask
    windows: tuple  # per layer, cycled (one entry: every layer)
    prefix: Optional[torch.Tensor] = None  # bool (B, N) on the host, or None

    def layer(self, i: int) -> LayerMask:
        return self.by_window[self.windows[i % len(self.windows)]]

    @property
    def batch(self) -> int:
        return self.layer(0).batch

    def allowed_pairs(self) -> float:
        """Allowed (query, key) pairs per head, summed over the micro-batch, averaged over the layers."""
        pairs = {w: m.allowed_pairs() for w, m in self.by_window.items()}
        return sum(pairs[w] for w in self.windows) / len(self.windows)

    @property
    def density(self) -> float:
        first = self.layer(0).mask
        return self.allowed_pairs() / (self.batch * first.n_q * first.n_k)

    def hide_prefix_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with IGNORE_INDEX where a prefix token's next token is in the prefix too: a bidirectional
        prefix sees it, so predicting it would be copying. The last prefix token still predicts the first token
        after the prefix, which it cannot see."""
        if self.prefix is None:
            return labels
        leak = torch.zeros_like(self.prefix)
        leak[:, :-1] = self.prefix[:, :-1] & self.prefix[:, 1:]
        return labels.masked_fill(leak.to(labels.device), IGNORE_INDEX)


def build_mask(doc_ids, backend: str, bbm_backend: str = "auto", check: bool = True, device=None,
               layer_windows: Sequence[Optional[int]] = (None,), prefix_fraction: float = 0.0) -> BatchMask:
    """The attention masks of one micro-batch: ``doc_ids`` int ``(B, N)``, a run of equal ids is one document.
    ``bbm_backend`` is the path ``bbm.attention`` takes for backend ``bbm``. ``check`` verifies that each id is
    one run (a device sync; the packed loader's ids are by construction). ``device``: where the masks live
    (default: the ids'); host ids with a GPU ``device`` spare bbm's document plans a device sync.
    ``layer_windows``: each layer's window (None: its whole document), cycled over the layers. ``prefix_fraction``: each document's first
    ``floor(fraction * length)`` tokens are a bidirectional prefix."""
    check_tensor("doc_ids", doc_ids, ndim=2, dtype_kind="int")
    if backend not in ATTENTION_BACKENDS:
        fail("backend", f"one of {ATTENTION_BACKENDS}", repr(backend))
    if not 0 <= prefix_fraction < 1:
        fail("prefix_fraction", "a fraction in [0, 1)", prefix_fraction)
    prefix = document_prefix(doc_ids.cpu(), prefix_fraction) if prefix_fraction else None
    by_window = {w: _layer_mask(doc_ids, backend, bbm_backend, check, device, w, prefix)
                 for w in dict.fromkeys(layer_windows)}
    return BatchMask(by_window, tuple(layer_windows), prefix)


def _layer_mask(doc_ids, backend, bbm_backend, check, device, window, prefix) -> LayerMask:
    b, n = doc_ids.shape
    if backend == "sdpa_causal":
        _warn_causal_once()
        return LayerMask(backend, b, bbm.Mask.causal(n, device=device or doc_ids.device))
    if prefix is not None and doc_ids.device.type != "cpu":
        prefix = prefix.to(doc_ids.device)
    mask = bbm.Mask.from_documents(doc_ids, window=window, prefix=prefix, check=check, device=device)
    if backend == "bbm":
        return LayerMask(backend, b, mask, bbm_backend=bbm_backend)
    if backend == "sdpa_masked":
        return LayerMask(backend, b, mask, dense=mask.to_dense())
    return LayerMask(backend, b, mask, block_mask=_flex_block_mask(mask))


def _warn_causal_once():
    global _warned_causal
    if not _warned_causal:
        warnings.warn("attention backend 'sdpa_causal' ignores document boundaries: tokens attend across "
                      "documents. Use it for speed comparison only.", stacklevel=4)
        _warned_causal = True


def _flex_block_mask(mask: bbm.Mask):
    """FlexAttention's BlockMask of a document mask (causal; a window; a prefix), its mask_mod evaluated per element
    inside FlexAttention's partial blocks."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, window, prefix = mask.documents, mask.window, mask.prefix
    b, n = doc.shape

    def document_mask(bi, h, q, k):
        allowed = (doc[bi, q] == doc[bi, k]) & (q >= k)
        if window is not None:
            allowed = allowed & (q - k < window)
        if prefix is not None:
            allowed = allowed | ((doc[bi, q] == doc[bi, k]) & prefix[bi, q] & prefix[bi, k])
        return allowed

    return create_block_mask(document_mask, b, None, n, n, device=doc.device, _compile=doc.is_cuda)


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention
    if q.is_cuda:  # the fused kernel needs torch.compile; eager (CPU, forward only) materialises the scores
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _additive_mask(layer_mask: LayerMask, dtype):
    """0 / -inf float mask, made once per micro-batch: SDPA converts a bool mask (and keeps the copy for
    backward) in every layer, N^2 bytes each."""
    if dtype not in layer_mask.biases:
        zero = torch.zeros((), dtype=dtype, device=layer_mask.dense.device)
        layer_mask.biases[dtype] = torch.where(layer_mask.dense, zero, float("-inf"))
    return layer_mask.biases[dtype]


def attend(q, k, v, layer_mask: LayerMask):
    """Attention of q ``(B, Hq, N, D)`` over k, v ``(B, Hkv, N, D)`` restricted by a layer's mask."""
    backend = layer_mask.backend
    if backend == "bbm":
        return bbm.attention(q, k, v, layer_mask.mask, backend=layer_mask.bbm_backend)
    if backend == "flex":
        return _flex(q, k, v, layer_mask.block_mask)
    if backend == "sdpa_masked":  # kv heads repeated: SDPA's memory-efficient kernel takes a mask but no GQA
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(layer_mask, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
