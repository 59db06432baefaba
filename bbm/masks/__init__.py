from bbm.masks.blocks import EMPTY, FULL, PARTIAL, BlockMeta
from bbm.masks.mask import Mask

__all__ = ["Mask", "BlockMeta", "EMPTY", "PARTIAL", "FULL"]
