"""PyTorch's scaled_dot_product_attention: full and exactly causal masks (its cuDNN kernel first, the fastest on
Hopper), and, for ``backend="sdpa"`` on other masks, the mask as a dense bool tensor."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels, fastest first on Hopper (cuDNN); each passes inputs it rejects to the next one
ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_warm_layouts = set()  # the (shape, strides, ...) keys of the inputs warm_causal has run for


def supports(mask) -> bool:
    """Whether SDPA runs ``mask`` without a dense mask: none (full attention) or exactly causal."""
    return mask is None or mask.exactly_causal


def causal_or_full(q, k, v, causal: bool, scale: float):
    with sdpa_kernel(ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def run(q, k, v, mask, scale: float):
    """Attention of validated inputs under ``mask`` (None: full)."""
    if mask is None or mask.exactly_causal:
        return causal_or_full(q, k, v, mask is not None, scale)
    return masked(q, k, v, mask.dense if mask.dense is not None else mask.to_dense(), scale)


def masked(q, k, v, allowed, scale: float):
    """SDPA with a dense bool mask. Rows with no allowed key (NaN in SDPA) attend to key 0 and are then
    zeroed, so they output zeros and pass no gradient."""
    has_key = allowed.any(-1, keepdim=True)
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    allowed = allowed | (first & ~has_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def warm_causal(q, k, v, scale: float):
    """Runs the causal attention forward and backward once per layout of inputs like these: a micro-batch of one
    document per sample goes there (``choose_backend``), and cuDNN builds its graphs on a shape's first call, which
    a training run then pays up front, with the ragged graphs, not in some later step."""
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
        out = causal_or_full(*leaves, True, scale)
        out.backward(out.detach())
