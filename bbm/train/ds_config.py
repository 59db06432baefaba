"""The DeepSpeed config dict, built from the YAML's sections (never a separate JSON file)."""
from bbm.train.config import TrainConfig


def deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    micro, accum = cfg.run.micro_batch_size, ds.gradient_accumulation_steps
    zero = {"stage": ds.zero_stage, "contiguous_gradients": True}
    if ds.zero_stage >= 1:
        # gradients are reduced (and copied into their partition, a host loop over parameters) a bucket at a
        # time as the backward produces them: buckets of 5e7 elements (DeepSpeed's default is 5e8) let that run
        # while the rest of the backward is still queued on the GPU, instead of all of it after the backward
        zero.update(overlap_comm=False, reduce_scatter=True, allgather_partitions=True, reduce_bucket_size=50_000_000)
    if ds.zero_stage == 3:
        # keep torch's F.linear: DeepSpeed's replacement reads each weight's integer ds_id, which torch.compile
        # guards on, so the blocks' compiled regions recompiled per layer and fell back to eager past the limit
        # (and an activation checkpoint's recompute then saved other tensors than its forward)
        zero["memory_efficient_linear"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        # DeepSpeed's bf16 overflow check (a few kernels per parameter, every step) skips steps with a non-finite
        # gradient: kept for run.on_nonfinite=skip; with stop the trainer checks the gradient norm instead
        "bf16": {"enabled": ds.bf16, "check_grad_overflow": cfg.run.on_nonfinite == "skip"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the optimizer is torch's AdamW (no FusedAdam build)
        "steps_per_print": 1 << 30,  # bbm logs its own metrics
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.extra)
