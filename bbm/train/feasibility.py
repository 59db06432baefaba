"""Will a training step fit? A cheap estimate before the first step, from ``bbm.distributed.memory``'s model:

    model states (parameters, gradients, optimizer states, ZeRO buffers, sharded by the ZeRO stage)
  + activations (bytes per local token x seq_len / sp x micro_batch_size)
  + on CPU, attention scores: the CPU paths (bbm's reference, masked SDPA) keep about ``SCORE_BYTES`` bytes per
    allowed (query, key) pair per head for the backward, in every layer (one layer with activation checkpointing);
    causal pairs are the upper bound (packed documents allow fewer)

against the device: free GPU memory plus what this process already holds, or on CPU the host's available RAM
shared by its ranks plus this process's resident memory. More than ``FAR_OVER`` times the device for the first
two terms, which are a lower bound, is an error naming the keys; more than the device for all three, a warning.
"""
import os
from dataclasses import dataclass

import torch

from bbm.distributed.memory import GIB, Dims, Setup, activation_bytes_per_token, model_state_bytes

FAR_OVER = 2.0
SCORE_BYTES = 8
KEYS = ("run.seq_len", "run.micro_batch_size")


@dataclass
class Estimate:
    states: float
    activations: float
    scores: float

    @property
    def lower(self) -> float:
        return self.states + self.activations


def estimate(cfg, model_cfg, world_size: int, sp: int, device: torch.device) -> Estimate:
    """Bytes one rank needs for a step of ``cfg`` (a TrainConfig; ``model_cfg`` with the vocabulary resolved)."""
    m, ds = model_cfg, cfg.deepspeed
    dims = Dims(m.vocab_size, m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.tie_embeddings)
    setup = Setup(ds.zero_stage, ds.bf16, ds.activation_checkpointing)
    n, batch = cfg.run.seq_len, cfg.run.micro_batch_size
    activations = activation_bytes_per_token(dims, sp, setup) * (n // sp) * batch
    scores = 0.0
    if device.type == "cpu" and m.attention in ("bbm", "sdpa_masked"):
        layers = 1 if ds.activation_checkpointing else m.n_layers
        scores = SCORE_BYTES * n * (n + 1) / 2 * batch * (m.n_heads // sp) * layers
    return Estimate(model_state_bytes(dims, world_size, setup), activations, scores)


def device_bytes(device: torch.device, local_ranks: int) -> tuple:
    """(bytes this rank may use, what they are) for ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device), f"GPU {device} memory"
    import psutil

    have = psutil.virtual_memory().available / local_ranks + psutil.Process().memory_info().rss
    share = f" shared by {local_ranks} ranks" if local_ranks > 1 else ""
    return have, f"available host RAM{share}"


def check(cfg, model_cfg, world_size: int, local_ranks: int, sp: int, device: torch.device):
    """(error, warning): each None or one line. The error names the keys that set the step's size."""
    need = estimate(cfg, model_cfg, world_size, sp, device)
    have, what = device_bytes(device, local_ranks)
    sizes = ", ".join(f"{k}={v}" for k, v in zip(KEYS, (cfg.run.seq_len, cfg.run.micro_batch_size)))
    parts = f"model states {need.states / GIB:.1f} GiB + activations {need.activations / GIB:.1f} GiB"
    if need.lower > FAR_OVER * have:
        return (f"{sizes}: expected a step that fits in {have / GIB:.1f} GiB ({what}), got an estimated "
                f"{need.lower / GIB:.1f} GiB per rank ({parts}); lower run.seq_len or run.micro_batch_size, or raise "
                "deepspeed.zero_stage / deepspeed.sequence_parallel_size, or set "
                "deepspeed.activation_checkpointing=true"), None
    if need.lower + need.scores > have:
        scores = f" + attention scores up to {need.scores / GIB:.1f} GiB" if need.scores else ""
        return None, (f"bbm train: warning: a step may not fit in {have / GIB:.1f} GiB ({what}): estimated "
                      f"{(need.lower + need.scores) / GIB:.1f} GiB per rank ({parts}{scores}) for {sizes}")
    return None, None


def local_ranks() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
