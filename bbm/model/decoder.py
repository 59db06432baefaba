"""LLaMA-style decoder: pre-norm blocks of GQA attention with RoPE on per-document positions and SwiGLU."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bbm._checks import fail
from bbm.data import IGNORE_INDEX
from bbm.model.backends import BatchMask, attend
from bbm.model.config import ModelConfig
from bbm.model.layers import RMSNorm, SwiGLU, apply_rope, maybe_compiled, rope_tables


class Attention(nn.Module):
    """GQA projections: q, k and v from one matmul, RoPE on q and k, and the output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def project(self, x, cos, sin):
        """q, k, v ``(B, N, H, D)``, each a contiguous tensor of its own (cuDNN's ragged path reads such
        memory as it is)."""
        b, n, _ = x.shape
        q, k, v = self.wqkv(x).view(b, n, -1, self.head_dim).split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous()


def attention_inputs(block, x, cos, sin):
    """A block's work before its attention: the pre-norm, and q, k, v ``(B, N, H, D)`` with RoPE."""
    return block.attn.project(block.attn_norm(x), cos, sin)


def block_output(block, x, out):
    """A block's work after its attention ``out (B, H, N, D)``: the output projection, the residual, and the
    SwiGLU sub-block with its pre-norm and residual."""
    x = x + block.attn.wo(out.transpose(1, 2).flatten(2))
    return x + block.mlp(block.mlp_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, fused=False)  # inside the block's compiled regions
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, fused=False)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)
        self.inputs = maybe_compiled(attention_inputs, cfg.fused)
        self.output = maybe_compiled(block_output, cfg.fused)

    def forward(self, x, cos, sin, layer_mask, attention_fn):
        q, k, v = self.inputs(self, x, cos, sin)
        # the attention runs between the compiled regions, as it is: any backend, or a sequence-parallel wrapper
        out = attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layer_mask)
        return self.output(self, x, out)


class Decoder(nn.Module):
    """``forward(tokens, position_ids, batch_mask, labels)`` -> mean next-token loss over labels != -100.

    ``attention_fn(q, k, v, layer_mask)`` is the one attention entry point; a wrapper (e.g. sequence
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
        self.loss_sum = maybe_compiled(loss_sum, cfg.fused)  # fused: the fp32 upcast of the logits inside the softmax
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
        for i, block in enumerate(self.blocks):
            layer_mask = batch_mask.layer(i)
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, layer_mask, self.attention_fn, use_reentrant=False)
            else:
                x = block(x, cos, sin, layer_mask, self.attention_fn)
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
