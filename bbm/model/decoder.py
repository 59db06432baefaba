"""LLaMA-style decoder: pre-norm blocks of GQA attention with RoPE on per-document positions and SwiGLU."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bbm._checks import fail
from bbm.data.packing import IGNORE_INDEX
from bbm.model.attention import BatchMask, attend
from bbm.model.config import ModelConfig
from bbm.model.layers import RMSNorm, SwiGLU, apply_rope, maybe_fused, rope_tables


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope = maybe_fused(apply_rope, cfg.fused)

    def forward(self, x, cos, sin, batch_mask: BatchMask, attention_fn):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = attention_fn(q, k, v, batch_mask)  # the single attention call site
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim, cfg.fused)

    def forward(self, x, cos, sin, batch_mask, attention_fn):
        x = x + self.attn(self.attn_norm(x), cos, sin, batch_mask, attention_fn)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """``forward(tokens, position_ids, batch_mask, labels)`` -> mean next-token loss over labels != -100.

    ``attention_fn(q, k, v, batch_mask)`` is the one attention entry point; a wrapper (e.g. sequence
    parallel) can replace it. ``checkpoint_layers`` recomputes each block in the backward pass."""

    def __init__(self, cfg: ModelConfig, checkpoint_layers: bool = False):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            fail("model.vocab_size", "an int (set it, or let the trainer take the tokenizer's)", None)
        self.cfg = cfg
        self.checkpoint_layers = checkpoint_layers
        self.attention_fn = attend
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused)
        self.loss_sum = maybe_fused(loss_sum, cfg.fused)  # fused: the fp32 upcast of the logits inside the softmax
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self):
        # normal init; residual output projections scaled down by depth (GPT-2)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                std = self.cfg.init_std
                if name.endswith(("attn.wo.weight", "mlp.down.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(p, 0.0, std)

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls: all but an untied input embedding (a lookup)."""
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        if not self.cfg.tie_embeddings:
            total -= getattr(self.embed.weight, "ds_numel", self.embed.weight.numel())
        return total

    def hidden(self, tokens, position_ids, batch_mask: BatchMask):
        x = self.embed(tokens)
        compute = torch.promote_types(x.dtype, torch.float32)
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta, compute)  # shared by all layers
        for block in self.blocks:
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, batch_mask, self.attention_fn, use_reentrant=False)
            else:
                x = block(x, cos, sin, batch_mask, self.attention_fn)
        return self.norm(x)

    def logits(self, tokens, position_ids, batch_mask: BatchMask):
        return self.lm_head(self.hidden(tokens, position_ids, batch_mask))

    def forward(self, tokens, position_ids, batch_mask: BatchMask, labels):
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return self.loss_sum(self.logits(tokens, position_ids, batch_mask), labels) / count


def loss_sum(logits, labels):
    """Summed next-token cross-entropy in fp32 (or finer) over labels != IGNORE_INDEX."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(compute).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
