"""Which config keys may differ between a checkpoint and the run that resumes from it.

A resumed run compares the checkpoint's saved resolved config with its own, key by key (dotted keys;
``deepspeed.extra`` is one value):

* ``CHANGEABLE`` keys (optimizer and schedule, run length, logging, evaluation, checkpointing, kernels) take their
  new value, announced in one line each;
* ``NOT_COMPARED`` keys (where the run lives, where it resumes from) are not compared;
* every other key cannot change: the model's shape and numerics, the data and its order (``run.seed`` included:
  the data order and random streams continue from the checkpoint, they cannot be re-seeded mid-run), sequence
  length and micro-batch, ZeRO stage, precision, sequence parallelism, raw DeepSpeed settings, and the world size.
  Any of them changed is one error that lists each key with its old and new value.

A key the checkpoint's config does not have (added to bbm since) is announced, never an error."""
from typing import List

CHANGEABLE = ("optimizer.", "schedule.", "metrics.", "wandb.", "checkpoint.", "eval.", "run.max_steps", "run.device",
              "run.on_nonfinite", "run.max_skips", "data.cache_dir", "data.num_workers", "data.prefetch",
              "deepspeed.gradient_accumulation_steps", "deepspeed.gradient_clipping",
              "deepspeed.activation_checkpointing", "model.fused", "model.bbm_backend")
NOT_COMPARED = ("run.dir", "checkpoint.resume")
OPAQUE = ("deepspeed.extra",)  # compared as one value
WORLD_SIZE = "world size"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in OPAQUE:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changeable(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE)


def compare(saved: dict, new: dict, saved_world: int, world: int, where) -> List[str]:
    """The lines announcing the changed keys that a resume applies; a ValueError naming ``where`` (the checkpoint)
    that lists every key that cannot change but did."""
    old, now = flatten(saved), flatten(new)
    old[WORLD_SIZE], now[WORLD_SIZE] = saved_world, world
    fixed, notes = [], []
    for key in sorted(now):
        if key in NOT_COMPARED:
            continue
        if key not in old:
            notes.append(f"resume: {key} = {now[key]!r} (not in the checkpoint's config)")
        elif _differ(old[key], now[key]):
            change = f"{key} {old[key]!r} -> {now[key]!r}"
            if changeable(key):
                notes.append(f"resume: {change} (applied)")
            else:
                fixed.append(change)
    if fixed:
        raise ValueError(f"checkpoint {where}: expected the keys that a resumed run cannot change as saved, got "
                         f"{'; '.join(fixed)} (set them back, or start a new run in another run.dir)")
    return notes


def _differ(a, b) -> bool:
    """Config values differ (an int and the equal float do not: YAML reads 1e-3 and 0.001 alike)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a != b
    return a != b or type(a) is not type(b)
