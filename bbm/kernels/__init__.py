"""Triton block-sparse flash attention over bbm's tile metadata (forward, backward, metadata build)."""
from bbm.kernels.op import flash_attention
from bbm.kernels.tuning import Config

__all__ = ["flash_attention", "Config"]
