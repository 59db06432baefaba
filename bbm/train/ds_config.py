"""The DeepSpeed config dict, built from the YAML's sections (never a separate JSON file).

ZeRO's communication settings, per stage, as DeepSpeed 0.19.8 uses them (``deepspeed/runtime/zero``):

* ``contiguous_gradients`` (every stage): each gradient is copied into a preallocated bucket as the backward
  produces it, so the reduction reads one flat buffer and memory does not fragment; ZeRO-1/2 keep the reduced
  slice in the flat partition from there.
* ``overlap_comm`` where there is anything to communicate (more than one rank, ``dp x sp``): ZeRO-1/2 then
  reduce each full bucket on a side stream while the backward goes on computing the next bucket (the compute
  stream only waits for the previous bucket's reduction before it reuses the double buffer), instead of on the
  compute stream in series with it; ZeRO-1 reduces in the backward's hooks at the accumulation boundary instead
  of in a loop over parameters after the backward. The price is a second bucket and one device
  synchronisation at the end of each backward. ZeRO-3 (DeepSpeed's own default) gathers the next blocks'
  parameters and reduce-scatters gradients on their own streams, so prefetching overlaps compute at all. On one
  rank there is nothing to overlap, so it is off. On CPUs DeepSpeed has no streams (``is_synchronized_device``):
  the same code runs in order and the flag changes nothing but the double buffer.
* ``reduce_bucket_size`` 5e7 elements (DeepSpeed's default is 5e8) in every stage: the reduction of the last
  bucket, and with ZeRO-1/2 the per-parameter host loop copying a bucket's result into the partition, are what
  the backward cannot hide, so buckets are a few per model (a 5e8 bucket would hold all of a 370M model and
  reduce only after its backward). One bucket (100 MB in bf16) is a message NCCL moves at full bandwidth, and
  the backward that fills the next one costs ``4 x 5e7 x tokens`` FLOPs, far more than the transfer at the
  contexts bbm trains.
* ZeRO-1/2 ``use_multi_rank_bucket_allreduce`` stays on (the default): each bucket is one all-reduce. Off, it
  would be one ``reduce`` per destination rank, and DeepSpeed synchronises the device before each of those
  under ``overlap_comm``.
* ZeRO-1/2 ``allgather_bucket_size`` 5e8 (DeepSpeed's default, named here): after the optimizer step the
  updated parameters are all-gathered in buckets of this many elements; nothing overlaps that (the next forward
  needs them), so buckets are large: a few hundred million parameters are one collective.
* ZeRO-3 keeps ``stage3_prefetch_bucket_size`` (5e7: about one decoder block of the 1B preset ahead) and
  ``stage3_param_persistence_threshold`` (1e5: the norms stay whole) at DeepSpeed's defaults.

``deepspeed.extra`` in the YAML is merged last, so any of these can be changed per run, e.g.
``deepspeed.extra.zero_optimization.overlap_comm=false``.
"""
from bbm.train.config import TrainConfig

REDUCE_BUCKET = 50_000_000  # elements per gradient reduction (reduce_bucket_size), every ZeRO stage
ALLGATHER_BUCKET = 500_000_000  # elements per parameter all-gather after the ZeRO-1/2 optimizer step


def deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def zero_settings(stage: int, ranks: int) -> dict:
    """The ``zero_optimization`` section of ZeRO ``stage`` on ``ranks`` processes (data x sequence parallel)."""
    zero = {"stage": stage, "contiguous_gradients": True}
    if stage == 0:
        return zero
    zero.update(overlap_comm=ranks > 1, reduce_scatter=True, reduce_bucket_size=REDUCE_BUCKET)
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ALLGATHER_BUCKET,
                    use_multi_rank_bucket_allreduce=True)
    else:
        # keep torch's F.linear: DeepSpeed's replacement reads each weight's integer ds_id, which torch.compile
        # guards on, so the blocks' compiled regions recompiled per layer and fell back to eager past the limit
        # (and an activation checkpoint's recompute then saved other tensors than its forward)
        zero["memory_efficient_linear"] = False
    return zero


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """DeepSpeed's config for ``world_size`` data-parallel ranks (its batch arithmetic; under sequence
    parallelism the job has ``world_size x deepspeed.sequence_parallel_size`` processes)."""
    ds = cfg.deepspeed
    micro, accum = cfg.run.micro_batch_size, ds.gradient_accumulation_steps
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        # DeepSpeed's bf16 overflow check (a few kernels per parameter, every step) skips steps with a non-finite
        # gradient: kept for run.on_nonfinite=skip; with stop the trainer checks the gradient norm instead
        "bf16": {"enabled": ds.bf16, "check_grad_overflow": cfg.run.on_nonfinite == "skip"},
        "fp16": {"enabled": False},
        "zero_optimization": zero_settings(ds.zero_stage, world_size * ds.sequence_parallel_size),
        "zero_allow_untested_optimizer": True,  # the optimizer is torch's AdamW (no FusedAdam build)
        "steps_per_print": 1 << 30,  # bbm logs its own metrics
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.extra)
