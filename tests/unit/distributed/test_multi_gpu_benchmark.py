"""benchmarks/multi_gpu.py: the plan for 1, 2, 4, 8 GPUs (every command, built without running), and one real run
on CPU ranks over gloo at a tiny scale (one-GPU baselines, two ranks data parallel) that writes both efficiencies
and the loss comparison."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from helpers.processes import REPO, benchmark_module

TINY = ["--config", "configs/tiny_cpu.yaml", "run.seq_len=128", "run.micro_batch_size=1", "model.dim=64",
        "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.max_documents=40"]


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("multi_gpu")


def test_plan_for_eight_gpus(bench, capsys):
    plan = bench.main(["--dry-run", "--device", "cpu", "--gpus", "1,2,4,8", "--config", "configs/gpt_125m_16k.yaml"])
    names = [run.name for run in plan["runs"]]
    baselines = [f"zero{s}_1gpu_accum{a}" for s in (2, 3) for a in (1, 2, 4, 8)]
    assert sorted(names) == sorted(baselines + [f"zero{s}_dp{g}" for s in (2, 3) for g in (2, 4, 8)]
                                   + ["zero2_sp2", "zero2_sp4"])
    assert [name for name, _ in plan["skipped"]] == ["zero2_sp8"]  # 12 heads do not split over 8 ranks
    for run in plan["runs"]:
        cmd = plan["commands"][run.name]
        if run.gpus == 1:
            assert cmd[1] == "train.py"
        else:
            assert cmd[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", str(run.gpus), "--master_port"]
        assert f"deepspeed.zero_stage={run.stage}" in cmd and "run.device=cpu" in cmd and "metrics.log_every=1" in cmd
        assert f"deepspeed.gradient_accumulation_steps={run.accum}" in cmd
        assert f"deepspeed.sequence_parallel_size={run.sp}" in cmd
    sp4 = next(run for run in plan["runs"] if run.name == "zero2_sp4")
    assert (sp4.gpus, sp4.accum, sp4.sp) == (4, 4, 4) and sp4.baselines() == ("zero2_1gpu_accum4", "zero2_1gpu_accum1")
    dp8 = next(run for run in plan["runs"] if run.name == "zero3_dp8")
    assert dp8.accum == 1 and dp8.baselines() == ("zero3_1gpu_accum8", "zero3_1gpu_accum1")
    assert len(capsys.readouterr().out.splitlines()) == len(names)


@pytest.mark.parametrize("args,words", [(["--gpus", "1,x"], ["--gpus", "'1,x'"]),
                                        (["--modes", "zero2,zero9"], ["--modes", "'zero2,zero9'"]),
                                        (["--log-every", "2"], ["--log-every", "--warmup 3", "got 2"])])
def test_bad_arguments_are_named(bench, args, words):
    with pytest.raises(SystemExit) as info:
        bench.main(["--dry-run", "--device", "cpu", *args])
    for word in words:
        assert word in str(info.value)


def test_two_cpu_ranks_end_to_end(tmp_path):
    out = tmp_path / "multi_gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--device", "cpu", "--gpus", "1,2", "--modes",
                           "zero2", "--warmup", "1", "--steps", "2", "--out", str(out), *TINY,
                           f"data.cache_dir={tmp_path / 'data'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"zero2_1gpu_accum1", "zero2_1gpu_accum2", "zero2_dp2"}
    dp2 = rows["zero2_dp2"]
    assert dp2["gpus"] == 2 and dp2["tokens_per_s"] > 0 and dp2["tokens_per_s_per_gpu"] == dp2["tokens_per_s"] / 2
    assert dp2["efficiency_same_global_batch"] == pytest.approx(
        dp2["tokens_per_s_per_gpu"] / rows["zero2_1gpu_accum2"]["tokens_per_s"])
    assert dp2["efficiency_same_per_gpu_batch"] == pytest.approx(
        dp2["tokens_per_s_per_gpu"] / rows["zero2_1gpu_accum1"]["tokens_per_s"])
    # two ranks of one sequence each train exactly what one rank accumulating two does (fp32, gloo)
    assert dp2["loss_records_compared"] == 3 and dp2["max_loss_diff"] < 1e-5
    assert "eff global" in proc.stdout and "zero2_dp2" in proc.stdout


def test_summary_and_comparison_over_records_of_several_steps(bench):
    """Records every 4 steps (and the first step's): the timed records are those after the warm-up."""
    args = argparse.Namespace(warmup=4, steps=8)

    def record(step, tokens, loss):
        return {"step": step, "tokens_per_s": tokens, "step_time_s": 1.0, "mfu": None, "peak_mem_gib": 1.0,
                "loss": loss}

    base = bench.summary(bench.Run("zero2_1gpu_accum2", 1, 2, 2),
                         [record(1, 1.0, 5.0), record(4, 2.0, 4.0), record(8, 100.0, 3.0), record(12, 120.0, 2.0),
                          record(14, 1.0, 1.0)], args)  # step 14: a profiled step after the timed ones
    assert base["tokens_per_s"] == 110.0 and base["loss"] == [5.0, 4.0, 3.0, 2.0]
    run = bench.Run("zero2_dp2", 2, 2, 1)
    row = bench.summary(run, [record(1, 1.0, 5.0), record(4, 2.0, 4.0), record(8, 180.0, 3.0), record(12, 200.0, 2.5)],
                        args)
    bench.compare(run, row, {"zero2_1gpu_accum2": base, "zero2_1gpu_accum1": dict(base, tokens_per_s=100.0)})
    assert row["tokens_per_s_per_gpu"] == 95.0 and row["efficiency_same_global_batch"] == pytest.approx(95 / 110)
    assert row["efficiency_same_per_gpu_batch"] == pytest.approx(0.95) and row["max_loss_diff"] == 0.5
