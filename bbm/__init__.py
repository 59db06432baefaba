"""bbm: Binary Block Masking, mask-aware flash attention for packed long sequences."""
from bbm.attention import attention, choose_backend, prepare
from bbm.masks import BlockMeta, Mask

__all__ = ["attention", "choose_backend", "prepare", "Mask", "BlockMeta"]
__version__ = "0.1.0"
