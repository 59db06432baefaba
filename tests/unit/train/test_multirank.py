"""Child processes through the real entry points: ``deepspeed --num_gpus 2 train.py`` (gloo on CPU) against
one rank with the same global batch, and a process killed in the middle of a checkpoint save."""
import json
import re
import sys
from pathlib import Path

import pytest

from bbm.train.env import free_port
from helpers.processes import python, run_child

# 2 layers, dim 64, N=128; one sequence per rank per micro-step; global batch 2 sequences
COMMON = ["--config", "configs/tiny_cpu.yaml", "run.seq_len=128", "run.micro_batch_size=1", "run.max_steps=4",
          "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.max_documents=40",
          "optimizer.lr=1e-2", "schedule.warmup_steps=0", "metrics.log_every=1", "metrics.gain_every=0",
          "metrics.progress_bar=false", "wandb.mode=disabled"]


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("multirank")


def common(work, resume="none"):
    return [*COMMON, f"data.cache_dir={work / 'data'}", f"checkpoint.resume={resume}"]


@pytest.fixture(scope="module")
def one_rank(work):
    """1 process, 2 micro-steps of 1 sequence: the same global batch as 2 ranks x 1."""
    run_dir = work / "one_rank"
    run_child(python("train.py", *common(work), "deepspeed.zero_stage=2", "deepspeed.gradient_accumulation_steps=2",
                     f"run.dir={run_dir}"))
    return records(run_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank(work, one_rank, stage):
    run_dir = work / f"two_ranks_zero{stage}"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    run_child([*launcher, "train.py", *common(work), f"deepspeed.zero_stage={stage}", f"run.dir={run_dir}"])
    two = records(run_dir)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert two[0]["tokens_per_s"] > 0 and two[-1]["loss"] < two[0]["loss"]
    for a, b in zip(one_rank, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


def test_killed_during_save_leaves_previous_checkpoint(work, one_rank):
    run_dir = work / "killed"
    root = run_dir / "checkpoints"
    overrides = [*common(work)[2:], "deepspeed.zero_stage=2", "deepspeed.gradient_accumulation_steps=2",
                 "checkpoint.every=2", f"run.dir={run_dir}"]
    proc = run_child(python("tests/helpers/train_scenarios.py", "killsave", work, *overrides), check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL inside the step-4 save
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / "tmp.step_00000004").is_dir() and not (root / "step_00000004").exists()
    # the same command resumes from step 2 and reproduces the uninterrupted run's steps 3 and 4
    proc = run_child(python("train.py", *common(work, resume="auto"), "deepspeed.zero_stage=2",
                            "deepspeed.gradient_accumulation_steps=2", "checkpoint.every=2", f"run.dir={run_dir}"))
    assert re.search(r"resumed from .*step_00000002 at step 2", proc.stdout)
    resumed = records(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in one_rank]
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(("step_", "tmp.", "trash.")))
    assert leftovers == ["step_00000002", "step_00000004"]  # the interrupted save was swept away


def test_sequence_parallel_two_ranks_equal_one_rank(work, one_rank):
    """Ulysses: 2 ranks split every sequence (dp 1 x sp 2); same global batch, same losses and grad norms."""
    run_dir = work / "sequence_parallel"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    run_child([*launcher, "train.py", *common(work), "deepspeed.zero_stage=2", "deepspeed.sequence_parallel_size=2",
               "deepspeed.gradient_accumulation_steps=2", f"run.dir={run_dir}"])
    sp = records(run_dir)
    assert [r["step"] for r in sp] == [1, 2, 3, 4]
    for a, b in zip(one_rank, sp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["tokens_per_s"] > 0
