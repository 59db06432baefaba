"""Model hyper-parameters (the `model:` section of a training YAML)."""
from dataclasses import dataclass
from typing import List, Optional

from bbm._checks import fail
from bbm._config import check_fields, setting
from bbm.backends import BACKENDS

ATTENTION_BACKENDS = ("bbm", "flex", "sdpa_masked", "sdpa_causal")


@dataclass
class ModelConfig:
    """model: a LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU)"""
    vocab_size: Optional[int] = setting(None, "output classes; null: the data's tokenizer's", within="[1, inf)")
    dim: int = setting(64, "model width", within="[1, inf)")
    n_layers: int = setting(2, "decoder blocks", within="[1, inf)")
    n_heads: int = setting(4, "query heads (head dim = dim / n_heads, even for RoPE)", within="[1, inf)")
    n_kv_heads: Optional[int] = setting(None, "key/value heads (GQA), a divisor of n_heads; null: n_heads",
                                        within="[1, inf)")
    ffn_dim: Optional[int] = setting(None, "SwiGLU hidden width; null: 8/3 * dim rounded up to multiple_of (LLaMA)",
                                     within="[1, inf)")
    multiple_of: int = setting(64, "rounding of the default ffn_dim", within="[1, inf)")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", within="(0, inf)")
    rope_theta: float = setting(10000.0, "RoPE base", within="(0, inf)")
    tie_embeddings: bool = setting(True, "the output projection shares the input embedding")
    init_std: float = setting(0.02, "std of the normal weight init (output projections scaled by depth)",
                              within="(0, inf)")
    attention: str = setting("bbm", "attention backend (sdpa_causal ignores documents: speed comparison only)",
                             choices=ATTENTION_BACKENDS)
    fused: bool = setting(True, "on CUDA: each block's work around its attention, the final norm and the loss "
                                "torch.compile'd")
    bbm_backend: str = setting("auto", "with attention=bbm: bbm.attention's backend=", choices=BACKENDS)
    windows: List[Optional[int]] = setting([], "attention windows of the layers, cycled over them: an int is a local "
                                           "layer (each token sees that many recent tokens of its document), null a "
                                           "global one (its whole document); e.g. [1024, null] alternates; []: all "
                                           "global", within="[1, inf)")
    prefix_fraction: float = setting(0.0, "each document's first floor(fraction * length) tokens attend "
                                          "bidirectionally (prefix-LM); their leaked labels are ignored",
                                     within="[0, 1)")

    def validate(self, prefix: str = "model"):
        check_fields(self, prefix)
        if self.dim % self.n_heads:
            fail(f"{prefix}.n_heads", f"a divisor of dim={self.dim}", self.n_heads)
        if self.head_dim % 2:
            fail(f"{prefix}.n_heads", "a head dim (dim / n_heads) that is even, for RoPE", f"head dim {self.head_dim}")
        if self.n_heads % self.kv_heads:
            fail(f"{prefix}.n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads)

    def layer_windows(self) -> tuple:
        """Each layer's attention window (None: its whole document)."""
        cycle = self.windows or [None]
        return tuple(cycle[i % len(cycle)] for i in range(self.n_layers))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        raw = int(8 * self.dim / 3)
        return -(-raw // self.multiple_of) * self.multiple_of
