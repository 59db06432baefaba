"""Which keys a resumed run may change: applied and announced, or one error listing every key that cannot."""
import pytest

from bbm.train.config import TrainConfig, to_dict
from bbm.train.resume import compare


def configs(**changes):
    saved, new = to_dict(TrainConfig()), to_dict(TrainConfig())
    for key, value in changes.items():
        section, name = key.split("__")
        new[section][name] = value
    return saved, new


def test_unchanged_config_resumes_silently():
    saved, new = configs(run__dir="elsewhere", checkpoint__resume="/some/step_00000002")
    assert compare(saved, new, 2, 2, "ckpt") == []


def test_changeable_keys_are_announced_one_line_each():
    saved, new = configs(optimizer__lr=1e-3, run__max_steps=500, schedule__kind="linear", metrics__log_every=5,
                         deepspeed__gradient_clipping=0.5, model__bbm_backend="reference")
    assert compare(saved, new, 1, 1, "ckpt") == [
        "resume: deepspeed.gradient_clipping 1.0 -> 0.5 (applied)",
        "resume: metrics.log_every 10 -> 5 (applied)",
        "resume: model.bbm_backend 'auto' -> 'reference' (applied)",
        "resume: optimizer.lr 0.0003 -> 0.001 (applied)",
        "resume: run.max_steps 100 -> 500 (applied)",
        "resume: schedule.kind 'cosine' -> 'linear' (applied)"]


def test_fixed_keys_are_one_error_listing_each_old_and_new_value():
    saved, new = configs(model__dim=128, deepspeed__zero_stage=3, deepspeed__bf16=True, data__tokenizer="t.json",
                         run__seq_len=4096, run__micro_batch_size=2, run__seed=7, deepspeed__sequence_parallel_size=2,
                         optimizer__lr=1.0)
    with pytest.raises(ValueError) as error:
        compare(saved, new, 2, 4, "runs/x/checkpoints/step_00000010")
    message = str(error.value)
    assert message.startswith("checkpoint runs/x/checkpoints/step_00000010: expected the keys that a resumed run "
                              "cannot change as saved, got ")
    for change in ("data.tokenizer 'byte' -> 't.json'", "deepspeed.bf16 False -> True", "deepspeed.zero_stage 0 -> 3",
                   "deepspeed.sequence_parallel_size 1 -> 2", "model.dim 64 -> 128", "run.seq_len 2048 -> 4096",
                   "run.micro_batch_size 1 -> 2", "run.seed 0 -> 7", "world size 2 -> 4"):
        assert change in message, change
    assert "optimizer.lr" not in message


def test_raw_deepspeed_settings_are_one_fixed_value_and_new_keys_are_announced():
    saved, new = configs(deepspeed__extra={"zero_optimization": {"reduce_bucket_size": 1}})
    with pytest.raises(ValueError, match=r"deepspeed.extra \{\} -> \{'zero_optimization': "):
        compare(saved, new, 1, 1, "ckpt")
    saved, new = configs(optimizer__weight_decay=0.0)
    saved["optimizer"]["weight_decay"] = 0  # an int and an equal float are the same value
    del saved["run"]["max_skips"]
    assert compare(saved, new, 1, 1, "ckpt") == ["resume: run.max_skips = 10 (not in the checkpoint's config)"]
