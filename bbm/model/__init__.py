"""LLaMA-style decoder with selectable attention backends (bbm, flex, sdpa_masked, sdpa_causal)."""
from bbm._lazy import lazy_exports

__all__ = ["ATTENTION_BACKENDS", "BatchMask", "Decoder", "LayerMask", "ModelConfig", "attend", "build_mask"]
lazy_exports(__name__, {"BatchMask": "bbm.model.backends", "LayerMask": "bbm.model.backends",
                        "attend": "bbm.model.backends", "build_mask": "bbm.model.backends",
                        "ATTENTION_BACKENDS": "bbm.model.config", "ModelConfig": "bbm.model.config",
                        "Decoder": "bbm.model.decoder"})
