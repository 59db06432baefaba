"""Model hyper-parameters (the `model:` section of a training YAML)."""
from dataclasses import dataclass
from typing import Optional

from bbm._checks import fail
from bbm.attention import BACKENDS

ATTENTION_BACKENDS = ("bbm", "flex", "sdpa_masked", "sdpa_causal")


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = None  # None: taken from the data's tokenizer
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (no GQA)
    ffn_dim: Optional[int] = None  # None: 8/3 * dim rounded up to multiple_of (LLaMA)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: str = "bbm"  # one of ATTENTION_BACKENDS
    fused: bool = True  # on CUDA: each block's work around its attention, the final norm and the loss torch.compile'd
    bbm_backend: str = "auto"  # with attention=bbm: bbm.attention's backend= (auto | triton | split | ragged | sdpa | reference)

    def validate(self, prefix: str = "model"):
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            if getattr(self, name) <= 0:
                fail(f"{prefix}.{name}", "a positive int", getattr(self, name))
        for name in ("vocab_size", "n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(f"{prefix}.{name}", "a positive int or null", value)
        if self.dim % self.n_heads:
            fail(f"{prefix}.n_heads", f"a divisor of dim={self.dim}", self.n_heads)
        if self.head_dim % 2:
            fail(f"{prefix}.n_heads", "a head dim (dim / n_heads) that is even, for RoPE", f"head dim {self.head_dim}")
        if self.n_heads % self.kv_heads:
            fail(f"{prefix}.n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads)
        if self.attention not in ATTENTION_BACKENDS:
            fail(f"{prefix}.attention", f"one of {ATTENTION_BACKENDS}", repr(self.attention))
        if self.bbm_backend not in BACKENDS:
            fail(f"{prefix}.bbm_backend", f"one of {BACKENDS}", repr(self.bbm_backend))
        for name in ("norm_eps", "rope_theta", "init_std"):
            if getattr(self, name) <= 0:
                fail(f"{prefix}.{name}", "a positive float", getattr(self, name))

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
