"""ZeRO's communication settings in the DeepSpeed dict: per stage, on one rank and on several (data or sequence
parallel), overridable through deepspeed.extra, and accepted by DeepSpeed's own config model."""
from pathlib import Path

import pytest

from bbm.train.config import load_config
from bbm.train.ds_config import ALLGATHER_BUCKET, REDUCE_BUCKET, deepspeed_config

REPO = Path(__file__).resolve().parents[3]


def zero(stage, dp, *overrides):
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [f"deepspeed.zero_stage={stage}", "model.n_heads=4", *overrides])
    return deepspeed_config(cfg, world_size=dp)["zero_optimization"]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_overlap_bucketed_all_reduces_on_several_ranks(stage):
    z = zero(stage, 4)
    assert z["overlap_comm"] and z["contiguous_gradients"] and z["use_multi_rank_bucket_allreduce"]
    assert z["reduce_bucket_size"] == REDUCE_BUCKET and z["allgather_bucket_size"] == ALLGATHER_BUCKET
    assert not zero(stage, 1)["overlap_comm"]  # one rank: nothing to overlap


def test_zero_3_overlaps_gathers_and_reductions():
    z = zero(3, 2)
    assert z["overlap_comm"] and z["reduce_bucket_size"] == REDUCE_BUCKET and z["memory_efficient_linear"] is False
    assert "allgather_bucket_size" not in z  # ZeRO-3 gathers by prefetch buckets (DeepSpeed's defaults)


def test_sequence_parallel_ranks_communicate_without_data_parallelism():
    assert zero(2, 1, "deepspeed.sequence_parallel_size=2")["overlap_comm"]


def test_stage_0_and_extra_overrides():
    assert zero(0, 4) == {"stage": 0, "contiguous_gradients": True}
    z = zero(2, 4, "deepspeed.extra.zero_optimization.overlap_comm=false",
             "deepspeed.extra.zero_optimization.reduce_bucket_size=1000")
    assert z["overlap_comm"] is False and z["reduce_bucket_size"] == 1000 and z["stage"] == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_accepts_the_settings(stage):
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    parsed = config.DeepSpeedZeroConfig(**zero(stage, 2))
    assert parsed.stage == stage and parsed.overlap_comm == (stage > 0)
