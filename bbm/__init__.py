"""bbm: Binary Block Masking, mask-aware flash attention for packed long sequences."""
from bbm.attention import attention, choose_backend, plan
from bbm.masks import Mask, TileMeta

__all__ = ["attention", "choose_backend", "plan", "Mask", "TileMeta"]
__version__ = "0.1.0"
