"""The mask function FlashAttention-4 evaluates on the partial tiles of a structured bbm mask, in CuTe DSL (a module
of its own: CuTe DSL compiles a function from its source file, and importing this needs ``cutlass``)."""
import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils


@cute.jit
def ranges_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """Key ``kv_idx`` is allowed for query ``q_idx`` iff it lies in [lo0, hi0) or [lo1, hi1) of the query's row:
    ``aux_tensors`` = lo0, hi0, lo1, hi1, int32 (B, N padded to whole tiles)."""
    b, q = batch[0], q_idx[0]
    lo0 = utils.scalar_to_ssa(aux_tensors[0][b, q], cutlass.Int32)
    hi0 = utils.scalar_to_ssa(aux_tensors[1][b, q], cutlass.Int32)
    lo1 = utils.scalar_to_ssa(aux_tensors[2][b, q], cutlass.Int32)
    hi1 = utils.scalar_to_ssa(aux_tensors[3][b, q], cutlass.Int32)
    return ((kv_idx >= lo0) & (kv_idx < hi0)) | ((kv_idx >= lo1) & (kv_idx < hi1))
