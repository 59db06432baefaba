"""``flash_attention``: the kernels behind two torch custom ops (``bbm::flash_fwd`` / ``bbm::flash_bwd``) with
autograd, so torch.compile'd models call them without a graph break, and, in eager mode, behind a plain
autograd.Function (no dispatcher cost per call). Activation checkpointing recomputes either."""
from typing import List, Optional, Tuple

import torch

from bbm.attention.triton import launch
from bbm.attention.triton.tuning import INTERPRETER, META_TILE, Config, interpreting, pick

_LIST_NAMES = ("q_count_full", "q_count", "q_idx", "q_order", "k_count_full", "k_count", "k_idx", "k_order",
               "ranges", "tile_bits", "bits_index")


def _config(given: List[int], direction: str, q, lists, run) -> Config:
    if given:
        return Config(*given).check()
    family = "ranges" if lists.ranges is not None else "bits"
    return pick(direction, q.device, q.shape[-1], q.dtype, family, q.shape[0] * q.shape[1] * q.shape[2], run)


def forward_pass(q, k, v, tensors, scale, given):
    """-> out, lse (base 2) of the forward kernel; tensors and given as from ``kernel_inputs``."""
    lists = launch.Lists(*tensors)
    cfg = _config(given, "fwd", q, lists, lambda c: launch.forward(q, k, v, lists, scale, c))
    return launch.forward(q, k, v, lists, scale, cfg)


def backward_pass(do, q, k, v, out, lse, tensors, scale, given):
    """-> dq, dk, dv of the backward kernels."""
    lists = launch.Lists(*tensors)
    do = _dense_rows(do)
    cfg = _config(given, "bwd", q, lists, lambda c: launch.backward(do, q, k, v, out, lse, lists, scale, c))
    return launch.backward(do, q, k, v, out, lse, lists, scale, cfg)


@torch.library.custom_op("bbm::flash_fwd", mutates_args=())
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_count_full: torch.Tensor,
              q_count: torch.Tensor, q_idx: torch.Tensor, q_order: torch.Tensor, k_count_full: torch.Tensor,
              k_count: torch.Tensor, k_idx: torch.Tensor, k_order: torch.Tensor, ranges: Optional[torch.Tensor],
              tile_bits: Optional[torch.Tensor], bits_index: Optional[torch.Tensor], scale: float,
              config: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return forward_pass(q, k, v, [q_count_full, q_count, q_idx, q_order, k_count_full, k_count, k_idx, k_order,
                              ranges, tile_bits, bits_index], scale, config)


@flash_fwd.register_fake
def _(q, k, v, *lists_and_args):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("bbm::flash_bwd", mutates_args=())
def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, q_count_full: torch.Tensor, q_count: torch.Tensor, q_idx: torch.Tensor,
              q_order: torch.Tensor, k_count_full: torch.Tensor, k_count: torch.Tensor, k_idx: torch.Tensor,
              k_order: torch.Tensor, ranges: Optional[torch.Tensor], tile_bits: Optional[torch.Tensor],
              bits_index: Optional[torch.Tensor], scale: float,
              config: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_pass(do, q, k, v, out, lse, [q_count_full, q_count, q_idx, q_order, k_count_full, k_count,
                                                     k_idx, k_order, ranges, tile_bits, bits_index], scale, config)


@flash_bwd.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[0], output[1], *[t for t in inputs[3:14]])
    ctx.none_mask = [t is None for t in inputs[3:14]]
    ctx.scale, ctx.config = inputs[14], inputs[15]


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    saved = [None if none else t for t, none in zip(saved, ctx.none_mask)]
    dq, dk, dv = flash_bwd(d_out, q, k, v, out, lse, *saved, ctx.scale, ctx.config)
    return (dq, dk, dv) + (None,) * 13


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerFlash(torch.autograd.Function):
    """The kernels of the two custom ops without the dispatcher's per-call cost, for eager mode (tracing
    under torch.compile takes the custom ops)."""

    @staticmethod
    def forward(ctx, q, k, v, tensors, scale, given):
        out, lse = forward_pass(q, k, v, tensors, scale, given)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.scale, ctx.given = scale, given
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        return backward_pass(d_out, q, k, v, out, lse, tensors, ctx.scale, ctx.given) + (None, None, None)


def _dense_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim is contiguous and empty_like(t) has its strides (so gradients can share
    the launch's strides), else a contiguous copy."""
    if t.is_contiguous() or (t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride()):
        return t
    return t.contiguous()


def kernel_inputs(q, k, v, mask, config: Optional[Config] = None):
    """-> (q, k, v with strides the kernels take, the tile metadata of ``mask`` and its tensors, the forced
    config as a list). ``config`` forces tile sizes (tests); by default they are tuned."""
    if config is None:
        tile = (INTERPRETER.tile_m, INTERPRETER.tile_n) if interpreting() or not q.is_cuda else META_TILE
    else:
        tile = (config.check().tile_m, config.tile_n)
    meta = mask.tile_meta(*tile)
    q, k, v = (_dense_rows(t) for t in (q, k, v))
    tensors = [getattr(meta, name) for name in _LIST_NAMES]
    return q, k, v, meta, tensors, ([] if config is None else list(config.__dict__.values()))


def flash_attention(q, k, v, mask, scale: float, config: Optional[Config] = None) -> torch.Tensor:
    """Block-sparse attention of validated q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) under ``mask`` (in the
    tensors' token order). ``config`` forces tile sizes (tests); by default they are tuned."""
    q, k, v, _, tensors, given = kernel_inputs(q, k, v, mask, config)
    if torch.compiler.is_compiling():
        return flash_fwd(q, k, v, *tensors, float(scale), given)[0]
    return _EagerFlash.apply(q, k, v, tensors, float(scale), given)
