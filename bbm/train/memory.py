"""The memory model (``bbm.distributed.memory``) on a training config: the longest context per GPU count.

    python -m bbm.train.memory --config configs/gpt_125m_16k.yaml [--gpus 1,2,4,8] [--sp max] [--measured 1:524288]
        [--gpu-gib 80] [key=value ...]

The ZeRO stage, bf16, activation checkpointing, micro-batch size, sequence-parallel size and ZeRO's gradient
buckets are the config's, as the trainer would run it (``deepspeed_config``); key=value overrides change them
like they change a run (``deepspeed.zero_stage=3 deepspeed.activation_checkpointing=true``). ``--sp max`` takes,
on each GPU count, the largest sequence-parallel size that splits the heads; with a fixed size, GPU counts it
does not divide are left out. ``--measured G:N`` (the longest context measured on G GPUs) calibrates the
activation bytes on that point.
"""
import argparse
import sys

from bbm._checks import check_positive_int, fail
from bbm.distributed.memory import Dims, Setup, calibrate, format_table, max_context
from bbm.train.config import TrainConfig, load_config
from bbm.train.ds_config import deepspeed_config

GPU_COUNTS = (1, 2, 4, 8)


def dims_from_config(cfg: TrainConfig) -> Dims:
    """``Dims`` of a TrainConfig; the vocabulary comes from the tokenizer when ``model.vocab_size`` is null."""
    m = cfg.model
    vocab = m.vocab_size
    if vocab is None:
        from bbm.data.tokenizer import load_tokenizer
        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    return Dims(vocab, m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.tie_embeddings)


def setup_from_config(cfg: TrainConfig, sp=None, gpu_gib: float = 80.0, reserve_gib: float = 3.0) -> Setup:
    """``Setup`` of a TrainConfig as the trainer runs it on several ranks. ``sp``: None for the config's
    sequence-parallel size, ``"max"`` for the largest that splits the heads, or a size."""
    ds = cfg.deepspeed
    zero = deepspeed_config(cfg, 2)["zero_optimization"]  # several ranks: the buckets of a multi-GPU run
    double = zero.get("overlap_comm", ds.zero_stage == 3) and ds.zero_stage in (1, 2)
    return Setup(zero_stage=ds.zero_stage, bf16=ds.bf16, checkpointing=ds.activation_checkpointing,
                 micro_batch=cfg.run.micro_batch_size,
                 sp=None if sp == "max" else ds.sequence_parallel_size if sp is None else sp,
                 reduce_bucket=float(zero.get("reduce_bucket_size", 5e8)), reduce_buffers=2 if double else 1,
                 gpu_gib=gpu_gib, reserve_gib=reserve_gib)


def parse_measured(text: str):
    gpus, _, tokens = text.partition(":")
    if not (gpus.isdigit() and tokens.isdigit()) or int(gpus) == 0 or int(tokens) == 0:
        fail("--measured", "GPUS:TOKENS, e.g. 1:65536", repr(text))
    return int(gpus), int(tokens)


def parse_counts(text: str):
    counts = []
    for part in text.split(","):
        if not part.strip().isdigit():
            fail("--gpus", "positive GPU counts separated by commas, e.g. 1,2,4,8", repr(text))
        counts.append(check_positive_int("--gpus", int(part)))
    return counts


def parse_sp(text: str):
    if text == "max":
        return "max"
    if not text.isdigit() or int(text) == 0:
        fail("--sp", "'max' or a positive sequence-parallel size", repr(text))
    return int(text)


def gpu_counts(given, setup: Setup):
    """The GPU counts of the table: those given (each a multiple of a fixed sp), or 1, 2, 4, 8 that are."""
    if given is None:
        return [g for g in GPU_COUNTS if setup.sp is None or g % setup.sp == 0]
    for g in given:
        if setup.sp is not None and g % setup.sp:
            fail("--gpus", f"multiples of the sequence-parallel size {setup.sp} (or --sp max)", g)
    return given


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (configs/); without it the defaults plus overrides")
    parser.add_argument("--gpus", help="GPU counts, e.g. 8 or 1,2,4,8 (default: those of 1, 2, 4, 8 the sp divides)")
    parser.add_argument("--sp", help="sequence-parallel size: a number, or max (default: the config's)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, NCCL, fragmentation")
    parser.add_argument("--measured", help="GPUS:TOKENS, a measured longest context, to calibrate activations")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. deepspeed.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        setup = setup_from_config(cfg, parse_sp(args.sp) if args.sp else None, args.gpu_gib, args.reserve_gib)
        gpus = gpu_counts(parse_counts(args.gpus) if args.gpus else None, setup)
        dims = dims_from_config(cfg)
        scale = calibrate(dims, *parse_measured(args.measured), setup) if args.measured else 1.0
        rows = [max_context(dims, g, setup, scale) for g in gpus]
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    name = args.config or "config"
    if args.measured:
        name += f" (activations x {scale:.2f}, calibrated on {args.measured})"
    print(format_table(name, dims, setup, rows))
    return rows


if __name__ == "__main__":
    main()
