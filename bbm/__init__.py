"""bbm: Binary Block Masking, mask-aware flash attention for packed long sequences."""
from bbm._lazy import lazy_exports

__all__ = ["attention", "choose_backend", "plan", "Mask", "TileMeta"]
__version__ = "0.1.0"
lazy_exports(__name__, {"attention": "bbm.attention", "choose_backend": "bbm.attention", "plan": "bbm.attention",
                        "Mask": "bbm.masks", "TileMeta": "bbm.masks"})
