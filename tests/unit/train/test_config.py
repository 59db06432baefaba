"""YAML -> typed config: presets load, overrides apply, unknown keys and wrong types name the key; the
DeepSpeed dict; the command line rejects bad configs before any process group starts."""
import importlib.util

import pytest
import torch

from bbm.train.config import TrainConfig, load_config
from bbm.train.ds_config import deepspeed_config
from helpers.processes import REPO

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.run.dir == f"runs/{path.stem}"


def test_gpu_presets_sizes():
    from bbm.model import Decoder

    expected = {"gpt_125m_16k": (125e6, 16384), "gpt_350m_32k": (350e6, 32768), "gpt_1b_64k": (1.0e9, 65536)}
    for name, (params, seq_len) in expected.items():
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.run.seq_len == seq_len and cfg.deepspeed.bf16
        with torch.device("meta"):
            model = Decoder(cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": 257}))
        assert model.matmul_params() == pytest.approx(params, rel=0.1), name


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs/tiny_cpu.yaml",
                      ["optimizer.lr=1e-3", "deepspeed.zero_stage=3", "model.n_kv_heads=null", "wandb.tags=[a, b]",
                       "optimizer.betas=[0.8, 0.9]", "deepspeed.extra.zero_optimization.reduce_bucket_size=1000"])
    assert cfg.optimizer.lr == 1e-3 and cfg.deepspeed.zero_stage == 3 and cfg.model.n_kv_heads is None
    assert cfg.wandb.tags == ["a", "b"] and cfg.optimizer.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, key, kind", [
    ("optimizer.lrr=1", "optimizer.lrr", ValueError),
    ("bogus=1", "bogus", ValueError),
    ("model.dim=wide", "model.dim", TypeError),
    ("run.max_steps=2.5", "run.max_steps", TypeError),
    ("deepspeed.bf16=maybe", "deepspeed.bf16", TypeError),
    ("optimizer.betas=[0.9]", "optimizer.betas", TypeError),
    ("optimizer.lr=-1", "optimizer.lr", ValueError),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage", ValueError),
    ("model.attention=dense", "model.attention", ValueError),
    ("model.bbm_backend=fast", "model.bbm_backend", ValueError),
    ("metrics.profile_steps=[3,2]", "metrics.profile_steps", ValueError),
    ("metrics.profile_steps=[0,2]", "metrics.profile_steps", ValueError),
    ("model.n_kv_heads=4", "model.n_kv_heads", ValueError),  # does not divide tiny_cpu's 6 heads
    ("data.source=web", "data.source", ValueError),
    ("data.prefetch=-1", "data.prefetch", ValueError),
    ("run.on_nonfinite=ignore", "run.on_nonfinite", ValueError),
    ("checkpoint.resume=/no/such/dir", "checkpoint.resume", ValueError),
    ("deepspeed.sequence_parallel_size=0", "deepspeed.sequence_parallel_size", ValueError),
    ("deepspeed.sequence_parallel_size=4", "model.n_heads", ValueError),  # 6 heads do not split 4 ways
    ("deepspeed.sequence_parallel_size=3", "model.n_kv_heads", ValueError),  # 2 kv heads vs 3 ranks
    ("optimizer=3", "optimizer", TypeError),
    ("run.seq_len.x=1", "run.seq_len", ValueError),
])
def test_bad_config_names_the_key(override, key, kind):
    with pytest.raises(kind) as info:
        load_config(REPO / "configs/tiny_cpu.yaml", [override])
    assert str(info.value).startswith(key), str(info.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seq_len: 128\nmodel:\n  dims: 64\n")
    with pytest.raises(ValueError, match=r"^model\.dims: expected a known key of 'model'"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="--config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_config_before_starting():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(SystemExit) as info:
        train.main(["--config", "configs/tiny_cpu.yaml", "optimizer.lrr=1"])
    assert "optimizer.lrr" in str(info.value.code)


def test_deepspeed_dict_follows_the_yaml():
    cfg = load_config(REPO / "configs/tiny_cpu.yaml",
                      ["deepspeed.zero_stage=3", "deepspeed.bf16=true", "deepspeed.gradient_accumulation_steps=4",
                       "deepspeed.gradient_clipping=0.5", "run.micro_batch_size=2",
                       "deepspeed.extra.zero_optimization.stage3_max_live_parameters=1000"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False} and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1000  # extra merged last
    skip = deepspeed_config(load_config(REPO / "configs/tiny_cpu.yaml", ["run.on_nonfinite=skip"]), world_size=1)
    assert skip["bf16"]["check_grad_overflow"]  # DeepSpeed skips steps with non-finite gradients


@pytest.mark.parametrize("script", ["quickstart.sh", "single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_launch_scripts_parse(script):
    import subprocess

    proc = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
