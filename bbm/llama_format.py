"""The Hugging Face LLaMA layout of a bbm decoder: weight names and ``config.json``.

bbm's decoder is a LLaMA: pre-norm RMSNorm blocks, rotate-half RoPE on (i, i + D/2) pairs with
``theta ** (-2j / D)`` frequencies, GQA, SwiGLU, optionally tied embeddings. Its fused projections split into
LLaMA's: ``wqkv`` rows are the q heads, then the k heads, then the v heads (head-major, as LLaMA's q/k/v_proj);
``gate_up`` rows are the gate, then the up projection."""
import torch

from bbm._checks import fail
from bbm.model.config import ModelConfig


def hf_config(cfg: ModelConfig, *, max_positions: int, eod_id: int, pad_id: int, dtype: torch.dtype) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with the same function as a bbm ``Decoder`` of ``cfg``. bbm
    documents start without a BOS token: prompts are fed as they are."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": max_positions, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": cfg.init_std,
        "bos_token_id": None, "eos_token_id": eod_id, "pad_token_id": pad_id, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config(hf: dict, **bbm_settings) -> ModelConfig:
    """The bbm ``ModelConfig`` of a LLaMA ``config.json`` (``bbm_settings``: attention, bbm_backend, ...)."""
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        fail("config.json head_dim", f"hidden_size / num_attention_heads = {hf['hidden_size']} / "
             f"{hf['num_attention_heads']} (bbm's decoder)", head_dim)
    return ModelConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"],
                       ffn_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"],
                       tie_embeddings=hf["tie_word_embeddings"], **bbm_settings)


def to_llama(state: dict, cfg: ModelConfig) -> dict:
    """bbm ``Decoder`` state dict -> LLaMA tensor names (each tensor its own contiguous copy, as safetensors
    stores them; no ``lm_head.weight`` with tied embeddings)."""
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[b + "attn.wqkv.weight"].split([q, kv, kv])
        gate, up = state[b + "mlp.gate_up.weight"].split([hidden, hidden])
        out.update({h + "input_layernorm.weight": state[b + "attn_norm.weight"],
                    h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk,
                    h + "self_attn.v_proj.weight": wv, h + "self_attn.o_proj.weight": state[b + "attn.wo.weight"],
                    h + "post_attention_layernorm.weight": state[b + "mlp_norm.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": state[b + "mlp.down.weight"]})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_llama(tensors: dict, cfg: ModelConfig) -> dict:
    """LLaMA tensor names -> a bbm ``Decoder`` state dict (the inverse of ``to_llama``)."""
    state = {"embed.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    state["lm_head.weight"] = tensors["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        state.update({
            b + "attn_norm.weight": tensors[h + "input_layernorm.weight"],
            b + "attn.wqkv.weight": torch.cat([tensors[h + f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            b + "attn.wo.weight": tensors[h + "self_attn.o_proj.weight"],
            b + "mlp_norm.weight": tensors[h + "post_attention_layernorm.weight"],
            b + "mlp.gate_up.weight": torch.cat([tensors[h + f"mlp.{p}_proj.weight"] for p in ("gate", "up")]),
            b + "mlp.down.weight": tensors[h + "mlp.down_proj.weight"]})
    return state
