from bbm.masks.tiles import EMPTY, FULL, PARTIAL, TileMeta
from bbm.masks.mask import Mask

__all__ = ["Mask", "TileMeta", "EMPTY", "PARTIAL", "FULL"]
