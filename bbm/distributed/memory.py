"""How long a context fits: a memory model of bbm training per GPU, for 1..G GPUs with Ulysses + ZeRO.

    python -m bbm.distributed.memory --config configs/X.yaml [--gpus 8] [--measured 1:65536] [key=value ...]

Per GPU, with G GPUs laid out as dp x sp (the largest sp <= G that splits the heads; dp = G / sp):

    fixed   = model states (ZeRO shards them over all G ranks) + ZeRO buffers + framework reserve
    per local token (N / sp tokens per GPU) = activations with per-block activation checkpointing
    longest context N = sp * (GPU memory - fixed) / (bytes per local token), rounded down to 1024

Model states, bytes per parameter (a = 2 for bf16, 4 for fp32): parameters a, gradients a, optimizer 12 in
bf16 (fp32 master 4 + Adam m, v 8) or 8 in fp32, plus a transient fp32 gradient copy of 4 at the optimizer
step in bf16. ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the parameters, over all
G ranks (DeepSpeed's Ulysses convention, see ``bbm.distributed.groups``). ZeRO-2/3 add the contiguous
gradient bucket (``reduce_bucket_size`` 5e8 elements x a); ZeRO-3 adds the gathered working set (two layers
and the embedding, unsharded).

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
These are estimates from the code's tensors, not measurements. ``--measured G:N`` (the longest context
measured on G GPUs) rescales the activation bytes so the model reproduces that point, then extrapolates.
"""
import argparse
import sys
from dataclasses import dataclass

from bbm._checks import check_positive_int, fail
from bbm.distributed.ulysses import kv_replication

GIB = 2 ** 30
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements); the trainer keeps contiguous_gradients
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
    zero_stage: int = 3
    bf16: bool = True
    checkpointing: bool = True
    gpu_gib: float = 80.0
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation


def layout(gpus: int, n_heads: int, kv_heads: int):
    """(dp, sp): the largest sp dividing ``gpus`` whose heads split over sp ranks (``kv_replication``)."""
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
    total = p * (a / (gpus if stage == 3 else 1) + a / (gpus if stage >= 2 else 1) + optim / (gpus if stage >= 1 else 1))
    if stage >= 2:
        total += a * min(REDUCE_BUCKET, p)
    if stage == 3:
        total += a * (2 * dims.layer_params + dims.vocab * dims.dim)
    return total


def activation_bytes_per_token(dims: Dims, sp: int, setup: Setup) -> float:
    """Activation bytes per local token (one GPU holds N / sp tokens)."""
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
    """The longest sequence (tokens) one dp x sp layout of ``gpus`` GPUs trains with micro-batch 1."""
    dp, sp = layout(gpus, dims.n_heads, dims.kv_heads)
    fixed = model_state_bytes(dims, gpus, setup) + setup.reserve_gib * GIB
    per_token = activation_bytes_per_token(dims, sp, setup) * act_scale
    free = setup.gpu_gib * GIB - fixed
    tokens = max(0, int(free // per_token)) * sp
    return {"gpus": gpus, "dp": dp, "sp": sp, "model_states_gib": model_state_bytes(dims, gpus, setup) / GIB,
            "kib_per_token": per_token / 1024, "max_context": tokens // ROUND * ROUND}


def calibrate(dims: Dims, gpus: int, context: int, setup: Setup) -> float:
    """Activation scale that makes the model's longest context on ``gpus`` GPUs equal the measured one."""
    dp, sp = layout(gpus, dims.n_heads, dims.kv_heads)
    free = setup.gpu_gib * GIB - model_state_bytes(dims, gpus, setup) - setup.reserve_gib * GIB
    if free <= 0:
        fail("--measured", f"a point where the model states fit ({gpus} GPU(s) leave no room in the model)", context)
    return free / (context / sp) / activation_bytes_per_token(dims, sp, setup)


def dims_from_config(cfg) -> Dims:
    """``Dims`` of a TrainConfig; the vocabulary comes from the tokenizer when ``model.vocab_size`` is null."""
    m = cfg.model
    vocab = m.vocab_size
    if vocab is None:
        from bbm.data.tokenizer import load_tokenizer
        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    return Dims(vocab, m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.tie_embeddings)


def format_table(name: str, dims: Dims, setup: Setup, rows) -> str:
    head = (f"{name}: {dims.params / 1e6:.1f}M params (dim {dims.dim}, {dims.n_layers} layers, {dims.n_heads}/"
            f"{dims.kv_heads} heads, ffn {dims.ffn}, vocab {dims.vocab}); ZeRO-{setup.zero_stage}, "
            f"{'bf16' if setup.bf16 else 'fp32'}, activation checkpointing {'on' if setup.checkpointing else 'off'}, "
            f"{setup.gpu_gib:g} GiB per GPU ({setup.reserve_gib:g} GiB reserved)")
    lines = [head, "| GPUs | dp x sp | model states GiB/GPU | KiB per local token | longest context |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['dp']} x {r['sp']} | {r['model_states_gib']:.1f} | {r['kib_per_token']:.1f} "
                     f"| {r['max_context']:,} ({r['max_context'] // 1024}k) |")
    return "\n".join(lines)


def parse_measured(text: str):
    gpus, _, tokens = text.partition(":")
    if not (gpus.isdigit() and tokens.isdigit()) or int(gpus) == 0 or int(tokens) == 0:
        fail("--measured", "GPUS:TOKENS, e.g. 1:65536", repr(text))
    return int(gpus), int(tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (configs/); without it the defaults plus overrides")
    parser.add_argument("--gpus", type=int, default=None, help="one GPU count (default: 1, 2, 4, 8)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, NCCL, fragmentation")
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--measured", help="GPUS:TOKENS, a measured longest context, to calibrate activations")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. model.dim=1024")
    args = parser.parse_args(argv)
    from bbm.train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        gpus = [check_positive_int("--gpus", args.gpus)] if args.gpus is not None else [1, 2, 4, 8]
        dims = dims_from_config(cfg)
        setup = Setup(args.zero_stage, cfg.deepspeed.bf16, cfg.deepspeed.activation_checkpointing,
                      args.gpu_gib, args.reserve_gib)
        scale = calibrate(dims, *parse_measured(args.measured), setup) if args.measured else 1.0
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    rows = [max_context(dims, g, setup, scale) for g in gpus]
    name = args.config or "config"
    if args.measured:
        name += f" (activations x {scale:.2f}, calibrated on {args.measured})"
    print(format_table(name, dims, setup, rows))
    return rows


if __name__ == "__main__":
    main()
