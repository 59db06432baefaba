"""The memory calculator: exact parameter counts, head-aware dp x sp layouts, the longest context as the
solution of the budget equation, calibration, and the CLI on real configs (``bbm.train.memory``), which takes
the ZeRO stage, precision, checkpointing, micro-batch, sequence-parallel size and buckets from the config."""
import ast

import pytest

from bbm.distributed.memory import (GIB, ROUND, Dims, Setup, activation_bytes_per_token, calibrate, layout,
                                    max_context, model_state_bytes)
from bbm.model import Decoder, ModelConfig
from bbm.train.config import load_config
from bbm.train.memory import main, setup_from_config
from helpers.processes import REPO


DIMS_1B = Dims(vocab=32000, dim=2048, n_layers=20, n_heads=16, kv_heads=4, ffn=5632)


@pytest.mark.parametrize("tied,kv", [(True, 2), (False, 4), (True, 1)])
def test_param_count_is_the_decoders(tied, kv):
    cfg = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=kv, tie_embeddings=tied)
    model = Decoder(cfg)
    dims = Dims(101, 64, 3, 4, kv, cfg.hidden_dim, tied)
    assert dims.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("gpus,heads,kv,want", [(8, 16, 8, (1, 8)), (8, 12, 4, (2, 4)), (8, 16, 2, (1, 8)),
                                                (8, 12, 3, (8, 1)), (8, 12, 6, (4, 2)), (3, 4, 4, (3, 1)), (1, 16, 4, (1, 1))])
def test_layout_splits_heads(gpus, heads, kv, want):
    assert layout(gpus, heads, kv) == want


def test_layout_with_a_fixed_sequence_parallel_size():
    assert layout(8, 16, 8, sp=2) == (4, 2) and layout(4, 12, 4, sp=1) == (4, 1)
    with pytest.raises(ValueError, match="sequence_parallel_size: expected a divisor of the GPU count 8, got 3"):
        layout(8, 12, 4, sp=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        layout(8, 12, 6, sp=4)


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("setup", [Setup(), Setup(zero_stage=2, bf16=False, checkpointing=False, reduce_buffers=2),
                                   Setup(zero_stage=1, micro_batch=2, sp=1)])
def test_longest_context_solves_the_budget(gpus, setup):
    row = max_context(DIMS_1B, gpus, setup)
    sp = row["sp"]
    fixed = model_state_bytes(DIMS_1B, gpus, setup) + setup.reserve_gib * GIB
    per_token = activation_bytes_per_token(DIMS_1B, sp, setup)

    def fits(n):
        return fixed + setup.micro_batch * n / sp * per_token <= setup.gpu_gib * GIB

    assert row["max_context"] > 0 and row["max_context"] % ROUND == 0
    assert fits(row["max_context"]) and not fits(row["max_context"] + ROUND)


def test_more_gpus_give_longer_contexts_under_zero3():
    contexts = [max_context(DIMS_1B, g, Setup())["max_context"] for g in (1, 2, 4, 8)]
    assert contexts == sorted(contexts) and contexts[-1] > 6 * contexts[0]


def test_zero_shards_model_states():
    p = DIMS_1B.params
    replicated = model_state_bytes(DIMS_1B, 8, Setup(zero_stage=0))
    assert replicated == pytest.approx(p * (2 + 2 + 16))  # bf16 params and grads, fp32 master + Adam + fp32 grad
    assert model_state_bytes(DIMS_1B, 8, Setup(zero_stage=3)) < replicated / 4


def test_calibration_reproduces_the_measured_point():
    setup = Setup()
    measured = 98304
    scale = calibrate(DIMS_1B, 1, measured, setup)
    assert max_context(DIMS_1B, 1, setup, scale)["max_context"] == measured
    # the same activation scale carries to 8 GPUs: the context there changes by 1 / scale
    ratio = max_context(DIMS_1B, 8, setup, 1.0)["max_context"] / max_context(DIMS_1B, 8, setup, scale)["max_context"]
    assert scale != pytest.approx(1.0, abs=0.05) and ratio == pytest.approx(scale, rel=0.01)


def test_distributed_layer_imports_nothing_from_train():
    """bbm.distributed sits below bbm.train: the memory model is arithmetic, its command line reads configs."""
    for path in (REPO / "bbm" / "distributed").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("bbm.train") for n in names), (path.name, names)


def test_setup_is_the_configs():
    """The 125M preset trains with ZeRO-2: the model plans ZeRO-2, with the trainer's double 5e7 buckets."""
    setup = setup_from_config(load_config(REPO / "configs/gpt_125m_16k.yaml", ["run.micro_batch_size=2"]))
    assert (setup.zero_stage, setup.bf16, setup.checkpointing, setup.micro_batch, setup.sp) == (2, True, False, 2, 1)
    assert (setup.reduce_bucket, setup.reduce_buffers) == (5e7, 2)
    one_b = setup_from_config(load_config(REPO / "configs/gpt_1b_64k.yaml"), sp="max")
    assert (one_b.zero_stage, one_b.checkpointing, one_b.sp, one_b.reduce_buffers) == (3, True, None, 1)


def test_cli_on_a_config(capsys):
    rows = main(["--config", "configs/tiny_cpu.yaml", "--gpus", "2", "--sp", "max", "model.n_heads=4",
                 "--measured", "1:200000"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["gpus"] == 2 and "| 2 | 1 x 2 |" in out and "calibrated on 1:200000" in out
    assert "ZeRO-1" in out  # the tiny preset's stage


def test_cli_takes_the_configs_sequence_parallel_size(capsys):
    rows = main(["--config", "configs/gpt_125m_16k.yaml", "deepspeed.sequence_parallel_size=2",
                 "deepspeed.activation_checkpointing=true"])
    out = capsys.readouterr().out
    assert [(r["gpus"], r["dp"], r["sp"]) for r in rows] == [(2, 1, 2), (4, 2, 2), (8, 4, 2)]
    assert "ZeRO-2" in out and "activation checkpointing on" in out


@pytest.mark.parametrize("args,words", [(["--measured", "8k"], ["--measured", "GPUS:TOKENS", "'8k'"]),
                                        (["--gpus", "0"], ["--gpus", "positive", "0"]),
                                        (["--gpus", "2,x"], ["--gpus", "separated by commas", "'2,x'"]),
                                        (["--sp", "two"], ["--sp", "'max'", "'two'"]),
                                        (["--gpus", "3", "--sp", "2", "model.n_heads=4"],
                                         ["--gpus", "multiples of the sequence-parallel size 2", "got 3"])])
def test_cli_bad_input_is_named(args, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", "configs/tiny_cpu.yaml"] + args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
