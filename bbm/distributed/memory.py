"""How long a context fits: a memory model of bbm training per GPU, for 1..G GPUs with Ulysses + ZeRO.

Pure arithmetic on a model's dimensions (``Dims``) and how it is trained (``Setup``); ``bbm.train.memory`` is
its command line on a training config (``python -m bbm.train.memory --config configs/X.yaml``).

Per GPU, with G GPUs laid out as dp x sp (``Setup.sp``, or the largest sp <= G that splits the heads; dp = G / sp):

    fixed   = model states (ZeRO shards them over all G ranks) + ZeRO buffers + framework reserve
    per local token (micro-batch x N / sp tokens per GPU) = activations with per-block activation checkpointing
    longest context N = sp * (GPU memory - fixed) / (micro-batch x bytes per local token), rounded down to 1024

Model states, bytes per parameter (a = 2 for bf16, 4 for fp32): parameters a, gradients a, optimizer 12 in
bf16 (fp32 master 4 + Adam m, v 8) or 8 in fp32, plus a transient fp32 gradient copy of 4 at the optimizer
step in bf16. ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the parameters, over all
G ranks (DeepSpeed's Ulysses convention, see ``bbm.distributed.groups``). ZeRO-1/2/3 add their contiguous
gradient buckets (``Setup.reduce_buffers`` of ``reduce_bucket_size`` elements x a: ZeRO-1/2 keep two where they
overlap the reduction with the backward); ZeRO-3 adds the gathered working set (two layers and the embedding,
unsharded).

Activations per local token (d model dim, k = kv heads x head dim, f FFN dim, H heads, V vocab, L layers),
from the tensors the code saves for backward (counted with saved-tensor hooks on CPU: 8d + a(6d + 2k + 4f)
+ 4H per block, one more a d for the all-to-all output under sequence parallelism):
  * one block's saved tensors, S = 8 d + a (7 d + 2 k + 4 f) + 4 H: two RMSNorms (fp32 copy 4 d, two
    bf16 tensors each), q, k, v and the output of attention (bbm attention is flash-style: O(N), the LSE),
    the output projection's input, SwiGLU's gate, up, product;
  * one block's backward in flight, T = 4 d + a (4 d + 2 k + 3 f) (gradients of the same tensors, the
    attention kernel's fp32 dq);
  * the loss head at its backward peak, (12 + a) V: the saved fp32 log-softmax, the fp32 gradients of it
    and of its input, and the logits' gradient;
  * with per-block activation checkpointing: (L + 1) d a of block inputs, plus max(head, S + T) while one
    block is recomputed; without: L S + max(head, T);
  * inputs: tokens, labels, positions (24), RoPE tables (8 x head dim), and, whole on every rank, the doc
    ids and the mask ranges (20 x sp).
These are estimates from the code's tensors, not measurements. ``calibrate`` (the longest context measured on G
GPUs) rescales the activation bytes so the model reproduces that point; the scale then carries to other counts.
"""
from dataclasses import dataclass
from typing import Optional

from bbm._checks import check_positive_int, fail
from bbm.distributed.ulysses import kv_replication

GIB = 2 ** 30
ROUND = 1024  # contexts are reported rounded down to a multiple of this


@dataclass
class Dims:
    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    kv_heads: int
    ffn: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * self.ffn + 2 * self.dim

    @property
    def params(self) -> int:
        """Exactly ``Decoder``'s parameter count (tied embedding counted once)."""
        embed = self.vocab * self.dim * (1 if self.tied else 2)
        return embed + self.n_layers * self.layer_params + self.dim


@dataclass
class Setup:
    """How the model trains on each GPU: ZeRO stage, precision, checkpointing, sequences per micro-batch, the
    sequence-parallel size (None: the largest that splits the heads over the GPUs), ZeRO's gradient buckets
    (``reduce_bucket_size`` elements, ``reduce_buffers`` of them) and the GPU's memory."""
    zero_stage: int = 3
    bf16: bool = True
    checkpointing: bool = True
    micro_batch: int = 1
    sp: Optional[int] = None
    reduce_bucket: float = 5e8  # DeepSpeed's default reduce_bucket_size (elements)
    reduce_buffers: int = 1
    gpu_gib: float = 80.0
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation


def layout(gpus: int, n_heads: int, kv_heads: int, sp: Optional[int] = None):
    """(dp, sp) of ``gpus`` GPUs: ``sp`` as given (it must divide ``gpus`` and split the heads), or the largest sp
    dividing ``gpus`` whose heads split over sp ranks (``kv_replication``)."""
    check_positive_int("gpus", gpus)
    if sp is not None:
        check_positive_int("sequence_parallel_size", sp)
        if gpus % sp:
            fail("sequence_parallel_size", f"a divisor of the GPU count {gpus}", sp)
        kv_replication(n_heads, kv_heads, sp)
        return gpus // sp, sp
    for sp in range(gpus, 1, -1):
        try:
            if gpus % sp == 0:
                kv_replication(n_heads, kv_heads, sp)
                return gpus // sp, sp
        except ValueError:
            continue
    return gpus, 1


def model_state_bytes(dims: Dims, gpus: int, setup: Setup) -> float:
    """Parameters, gradients, optimizer states and ZeRO buffers on one GPU."""
    a = 2 if setup.bf16 else 4
    p, stage = dims.params, setup.zero_stage
    optim = 12 + 4 if setup.bf16 else 8  # bf16: fp32 master + Adam m, v, and the fp32 gradient at the step
    total = p * (a / (gpus if stage == 3 else 1) + a / (gpus if stage >= 2 else 1)
                 + optim / (gpus if stage >= 1 else 1))
    if stage >= 1:
        total += a * setup.reduce_buffers * min(setup.reduce_bucket, p)
    if stage == 3:
        total += a * (2 * dims.layer_params + dims.vocab * dims.dim)
    return total


def activation_bytes_per_token(dims: Dims, sp: int, setup: Setup) -> float:
    """Activation bytes per local token (one GPU holds N / sp tokens of each sequence)."""
    a = 2 if setup.bf16 else 4
    d, f = dims.dim, dims.ffn
    k = dims.kv_heads * max(1, sp // dims.kv_heads) * dims.head_dim  # kv heads are replicated below sp
    saved = 8 * d + a * (7 * d + 2 * k + 4 * f) + 4 * dims.n_heads
    in_flight = 4 * d + a * (4 * d + 2 * k + 3 * f)
    head = (12 + a) * dims.vocab
    if setup.checkpointing:
        layers = (dims.n_layers + 1) * d * a + max(head, saved + in_flight)
    else:
        layers = dims.n_layers * saved + max(head, in_flight)
    return layers + 24 + 8 * dims.head_dim + 20 * sp


def max_context(dims: Dims, gpus: int, setup: Setup, act_scale: float = 1.0) -> dict:
    """The longest sequence (tokens) the dp x sp layout of ``gpus`` GPUs trains, ``setup.micro_batch`` of them
    per micro-batch."""
    dp, sp = layout(gpus, dims.n_heads, dims.kv_heads, setup.sp)
    states = model_state_bytes(dims, gpus, setup)
    per_token = activation_bytes_per_token(dims, sp, setup) * act_scale
    free = setup.gpu_gib * GIB - states - setup.reserve_gib * GIB
    tokens = max(0, int(free // (per_token * setup.micro_batch))) * sp
    return {"gpus": gpus, "dp": dp, "sp": sp, "model_states_gib": states / GIB, "kib_per_token": per_token / 1024,
            "max_context": tokens // ROUND * ROUND}


def calibrate(dims: Dims, gpus: int, context: int, setup: Setup) -> float:
    """Activation scale that makes the model's longest context on ``gpus`` GPUs equal the measured one."""
    dp, sp = layout(gpus, dims.n_heads, dims.kv_heads, setup.sp)
    free = setup.gpu_gib * GIB - model_state_bytes(dims, gpus, setup) - setup.reserve_gib * GIB
    if free <= 0:
        fail("measured", f"a point where the model states fit ({gpus} GPU(s) leave no room in the model)", context)
    return free / (setup.micro_batch * context / sp) / activation_bytes_per_token(dims, sp, setup)


def format_table(name: str, dims: Dims, setup: Setup, rows) -> str:
    head = (f"{name}: {dims.params / 1e6:.1f}M params (dim {dims.dim}, {dims.n_layers} layers, {dims.n_heads}/"
            f"{dims.kv_heads} heads, ffn {dims.ffn}, vocab {dims.vocab}); ZeRO-{setup.zero_stage}, "
            f"{'bf16' if setup.bf16 else 'fp32'}, activation checkpointing {'on' if setup.checkpointing else 'off'}, "
            f"micro-batch {setup.micro_batch}, sequence parallel {setup.sp or 'max'}, "
            f"{setup.gpu_gib:g} GiB per GPU ({setup.reserve_gib:g} GiB reserved)")
    lines = [head, "| GPUs | dp x sp | model states GiB/GPU | KiB per local token | longest context |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['dp']} x {r['sp']} | {r['model_states_gib']:.1f} | {r['kib_per_token']:.1f} "
                     f"| {r['max_context']:,} ({r['max_context'] // 1024}k) |")
    return "\n".join(lines)
