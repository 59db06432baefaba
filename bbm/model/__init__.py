"""LLaMA-style decoder with selectable attention backends (bbm, flex, sdpa_masked, sdpa_causal)."""
from bbm._lazy import lazy_exports

__all__ = ["ATTENTION_BACKENDS", "BatchMask", "Decoder", "IGNORE_INDEX", "ModelConfig", "allowed_pairs", "attend",
           "build_mask"]
lazy_exports(__name__, {"BatchMask": "bbm.model.attention", "allowed_pairs": "bbm.model.attention",
                        "attend": "bbm.model.attention", "build_mask": "bbm.model.attention",
                        "ATTENTION_BACKENDS": "bbm.model.config", "ModelConfig": "bbm.model.config",
                        "Decoder": "bbm.model.decoder", "IGNORE_INDEX": "bbm.model.decoder"})
