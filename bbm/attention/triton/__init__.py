"""Triton block-sparse flash attention over bbm's tile metadata: the path for every mask, on any CUDA GPU, and in
Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
from bbm.attention.triton.op import flash_attention
from bbm.attention.triton.tuning import Config, interpreting

__all__ = ["Config", "available", "flash_attention"]


def available(q) -> bool:
    """Whether the kernels can run on tensors like ``q``: CUDA, or the CPU under Triton's interpreter."""
    return q.is_cuda or interpreting()
