"""The memory estimate before the first step: an error naming the keys when a step is far too large, a warning
when it may not fit, nothing for a step that fits."""
import dataclasses
from pathlib import Path

import torch

from bbm.distributed.memory import GIB
from bbm.train import feasibility
from bbm.train.config import load_config

PRESET = Path(__file__).resolve().parents[3] / "configs" / "tiny_cpu.yaml"
CPU = torch.device("cpu")


def check(have_gib, *overrides):
    cfg = load_config(PRESET, overrides)
    model = dataclasses.replace(cfg.model, vocab_size=257)
    original = feasibility.device_bytes
    feasibility.device_bytes = lambda device, ranks: (have_gib * GIB, "available host RAM")
    try:
        return feasibility.check(cfg, model, 1, 1, 1, CPU)
    finally:
        feasibility.device_bytes = original


def test_the_cpu_preset_fits():
    assert check(1.0) == (None, None)


def test_a_step_far_over_the_device_is_an_error_naming_the_keys():
    error, warning = check(4.0, "run.seq_len=100000")
    assert warning is None
    assert error.startswith("run.seq_len=100000, run.micro_batch_size=4: expected a step that fits in 4.0 GiB "
                            "(available host RAM), got an estimated 10.8 GiB per rank (model states 0.0 GiB + "
                            "activations 10.8 GiB)")


def test_a_step_that_may_not_fit_is_a_warning():
    error, warning = check(16.0, "run.seq_len=100000")
    assert error is None
    assert warning.startswith("bbm train: warning: a step may not fit in 16.0 GiB (available host RAM): estimated ")
    assert "attention scores up to" in warning


def test_activation_checkpointing_and_sequence_parallelism_shrink_the_estimate():
    cfg = load_config(PRESET, ["run.seq_len=65536"])
    model = dataclasses.replace(cfg.model, vocab_size=257)
    plain = feasibility.estimate(cfg, model, 1, 1, CPU)
    cfg.deepspeed.activation_checkpointing = True
    checkpointed = feasibility.estimate(cfg, model, 1, 1, CPU)
    assert checkpointed.activations < plain.activations and checkpointed.scores == plain.scores / 3
    assert feasibility.estimate(cfg, model, 2, 2, CPU).activations < checkpointed.activations / 1.9


def test_device_bytes_on_cpu_is_the_share_of_available_ram():
    one, what = feasibility.device_bytes(CPU, 1)
    two, _ = feasibility.device_bytes(CPU, 2)
    assert 0 < two < one and what == "available host RAM"
