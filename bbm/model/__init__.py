"""LLaMA-style decoder with selectable attention backends (bbm, flex, sdpa_masked, sdpa_causal)."""
from bbm.model.backends import BatchMask, LayerMask, attend, build_mask
from bbm.model.config import ATTENTION_BACKENDS, ModelConfig
from bbm.model.decoder import Decoder

__all__ = ["ATTENTION_BACKENDS", "BatchMask", "Decoder", "LayerMask", "ModelConfig", "attend", "build_mask"]
