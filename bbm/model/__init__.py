"""LLaMA-style decoder with selectable attention backends (bbm, flex, sdpa_masked, sdpa_causal)."""
from bbm.model.attention import BatchMask, allowed_pairs, attend, build_mask
from bbm.model.config import ATTENTION_BACKENDS, ModelConfig
from bbm.model.decoder import IGNORE_INDEX, Decoder

__all__ = ["ATTENTION_BACKENDS", "BatchMask", "Decoder", "IGNORE_INDEX", "ModelConfig", "allowed_pairs", "attend",
           "build_mask"]
