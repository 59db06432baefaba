"""DeepSpeed with ParallelGroups as its mpu, 4 gloo processes = data parallel 2 x sequence parallel 2: one
optimizer step (SGD, lr 1, gradient clipping active) moves every parameter by the clipped mean over the two
DP samples of the whole-sequence gradient, for ZeRO stages 0, 2 and 3. That checks what DeepSpeed is handed:
the all-rank ZeRO partition group, gradients summed over SP and averaged over DP, the gradient norm, and
the data-parallel size in its batch arithmetic."""
import copy
import importlib
import os

import pytest
import torch

from bbm.distributed import ParallelGroups, UlyssesAttention, sequence_parallel_loss, shard_batch
from bbm.model import Decoder, ModelConfig, attend, build_mask
from helpers.model import packed_batch
from helpers.ranks import run

deepspeed = pytest.importorskip("deepspeed")
# ZeRO's optimizer check imports DeepSpeed's Muon module, which imports torch inductor (~5 s): once here,
# before forking, instead of in 4 processes sharing the CI's 2 cores
importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
STAGES = (0, 2, 3)


def _init_deepspeed(rank, world):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # DeepSpeed's CPU shared-memory all-reduce is a C++ op JIT-built on first use (~90 s on the CI); the same
    # reductions run through the gloo group instead, which is what this test checks (as bbm.train.env does)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group the harness made


def _engine_step_matches(rank, world):
    _init_deepspeed(rank, world)
    groups = ParallelGroups(sp_size=2)
    vocab, n = 61, 32
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16))
    batches = [packed_batch(1, n, vocab, 4, d) for d in range(groups.dp_size)]
    # reference in float64: mean over the DP samples of the whole-sequence gradient, and its norm
    ref = copy.deepcopy(model).double()
    grads = [torch.autograd.grad(ref(b["tokens"], b["position_ids"], build_mask(b["doc_ids"], "bbm"), b["labels"]),
                                 list(ref.parameters())) for b in batches]
    mean = [sum(g) / len(g) for g in zip(*grads)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in mean))
    clip = 0.5 * norm.item()  # active clipping: the update is mean * clip / norm
    mine = batches[groups.dp_rank]  # the loader is sharded by DP rank; the SP group shares the sample
    shard = shard_batch(mine, groups.sp_rank, groups.sp_size)
    mask = build_mask(mine["doc_ids"], "bbm")
    for stage in STAGES:
        sp_model = copy.deepcopy(model)
        sp_model.attention_fn = UlyssesAttention(groups.sp_group, attend)
        config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": groups.dp_size,
                  "gradient_clipping": clip, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=sp_model, optimizer=torch.optim.SGD(sp_model.parameters(), lr=1.0),
                                          config=config, mpu=groups)
        loss = engine(shard["tokens"], shard["position_ids"], mask, shard["labels"])
        engine.backward(sequence_parallel_loss(loss, shard["labels"], groups.sp_group))
        engine.step()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            for (name, p0), p1, g in zip(model.named_parameters(), params, mean):
                step = (p0.detach() - p1.detach()).double()
                torch.testing.assert_close(step, g * clip / norm, rtol=1e-4, atol=1e-7,
                                           msg=f"ZeRO-{stage} rank {rank} {name}")
        engine.destroy()


def test_deepspeed_dp2_sp2_step_equals_unsharded():
    run(_engine_step_matches, 4)
