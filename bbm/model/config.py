"""Model hyper-parameters (the `model:` section of a training YAML)."""
from dataclasses import dataclass, field
from typing import List, Optional

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
    bbm_backend: str = "auto"  # with attention=bbm: bbm.attention's backend= (auto | ragged | triton | sdpa | reference)
    # attention windows of the layers, cycled over them: an int is a local layer (each token sees that many recent
    # tokens of its document), null a global one (its whole document); e.g. [1024, null] alternates. []: all global
    windows: List[Optional[int]] = field(default_factory=list)
    prefix_fraction: float = 0.0  # each document's first floor(fraction * length) tokens: a bidirectional prefix

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
        for i, window in enumerate(self.windows):
            if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
                fail(f"{prefix}.windows[{i}]", "a positive int (a local layer's window) or null (a global layer)",
                     repr(window))
        if not 0 <= self.prefix_fraction < 1:
            fail(f"{prefix}.prefix_fraction", "a fraction in [0, 1)", self.prefix_fraction)

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
