"""``launch_kernel``: ``triton.jit`` for kernels the host launches, shared by the mask metadata build
(bbm.masks.tiles_gpu) and the attention kernels (bbm.attention.triton)."""
import inspect

import triton

# Sizes that change with the sequence or the mask (lengths, tile counts, tiles with work). Triton compiles a
# variant of a kernel per value class of each integer argument (1, a multiple of 16, other) unless told not to:
# a training run would compile again in whichever step first met a new class (seconds per kernel).
SIZE_ARGS = ("n", "n_q", "n_k", "NUM_M", "NUM_N", "num_m", "num_n", "n_items", "n_q_items", "n_k_items", "n_dkdv",
             "lines_q", "lines_k", "q_programs")


def launch_kernel(fn):
    """``triton.jit`` with no specialisation on the size arguments ``fn`` has."""
    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in SIZE_ARGS if name in names])
