"""One child process runs the single-rank DeepSpeed scenarios (tests/helpers/train_scenarios.py); these tests read
its results. ZeRO 0-3, metrics + W&B offline, stop-and-resume, non-finite loss."""
import json
import math
from pathlib import Path

import pytest

from helpers.processes import REPO, python, run_child

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops", "mfu",
               "tflops_dense_convention", "mfu_dense_convention", "attention_density", "peak_mem_gib"}
GAIN_KEYS = {"attention_ms", "dense_causal_ms", "gain_vs_dense"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("scenarios")
    run_child(python(REPO / "tests/helpers/train_scenarios.py", "single", work), timeout=600)
    out = json.loads((work / "results.json").read_text())
    out["workdir"] = str(work)
    return out


def scenario(results, name):
    if "crash" in results[name]:
        pytest.fail(results[name]["crash"])
    return results[name]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_trains(results, stage):
    run = scenario(results, "stages")[f"zero{stage}"]
    losses = run["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # ln(256) = 5.5 at the start; a few steps of lr 1e-2 fall fast
    assert Path(run["summary"]["checkpoint"]).name == "step_00000006"
    assert (Path(run["summary"]["run_dir"]) / "dashboard.png").stat().st_size > 10_000


def test_zero3_keeps_last_checkpoints_only(results):
    root = Path(scenario(results, "stages")["zero3"]["summary"]["run_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006"


def test_zero3_keeps_torch_linear(results):
    """DeepSpeed's ZeRO-3 linear reads each weight's integer ds_id, which torch.compile guards on: the blocks'
    compiled regions recompiled per layer, fell back to eager, and broke activation checkpointing."""
    assert all(scenario(results, "stages")[f"zero{stage}"]["torch_linear"] for stage in range(4))


def test_metrics_jsonl_and_wandb_offline(results):
    run = scenario(results, "stages")["zero2"]
    run_dir = Path(run["summary"]["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert METRIC_KEYS <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["attention_density"] <= 0.5 + 1 / 128
        # allowed pairs <= N^2 pairs, so the honest figure never exceeds the dense convention's
        assert 0 < r["tflops"] <= r["tflops_dense_convention"] and r["mfu"] == pytest.approx(r["tflops"] / 0.2)
    measured = [r for r in records if r["step"] % 2 == 0]
    assert all(GAIN_KEYS <= r.keys() and r["gain_vs_dense"] > 0 for r in measured)
    wandb_dir = Path(run["summary"]["wandb_dir"])
    assert wandb_dir.parent == run_dir / "wandb" and wandb_dir.name.startswith("offline-run-")
    assert list(wandb_dir.glob("run-*.wandb")), "the offline run file that `wandb sync` uploads"


def test_profiled_steps_leave_a_trace_and_an_operator_table(results):
    profile = Path(scenario(results, "stages")["zero1"]["summary"]["run_dir"]) / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["ops_rank0.txt", "trace_rank0.json"]
    events = json.loads((profile / "trace_rank0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::mm", "aten::bmm"} & names or "aten::addmm" in names, sorted(names)[:40]
    table = (profile / "ops_rank0.txt").read_text()
    assert table.startswith("steps 2-3, sorted by self_cpu_time_total") and "aten::" in table


def test_stop_and_resume_reproduces_the_loss_curve_exactly(results):
    r = scenario(results, "resume")
    assert r["stopped"]["stopped"] and r["stopped"]["step"] == 3 and r["resumed_at"] == 3
    assert len(r["whole"]) == 6 and r["parts"] == r["whole"]  # bitwise: the same floats
    # the dashboard's resume marker, a wall-clock that continues, one train.log for both parts
    assert r["markers"] == [[4, 3]] and all(a < b for a, b in zip(r["elapsed"], r["elapsed"][1:]))
    log = r["log"].splitlines()
    assert [line.split("|")[0].strip() for line in log if line.startswith("step ")] == [f"step {i}/6" for i in range(1, 7)]
    assert sum(line.startswith("resumed from ") for line in log) == 1


@pytest.mark.parametrize("case, arg", [("loss_stop", "loss"), ("grad_stop", "grad_norm")])
def test_nonfinite_stops_naming_the_step(results, case, arg):
    """A NaN loss, or (bf16, ZeRO-2) an infinite gradient under a finite loss, stops the run at step 3."""
    r = scenario(results, "nonfinite")[case]
    assert r["error"] is not None and r["error"].startswith(f"{arg}: ") and "step 3" in r["error"]


def test_nonfinite_loss_skipped_when_configured(results):
    r = scenario(results, "nonfinite")["loss_skip"]
    assert r["error"] is None
    records = r["records"]
    assert [x["skipped_batches"] for x in records] == [0, 0, 1, 0, 0, 0]
    assert all(math.isfinite(x["loss"]) for x in records)


def test_nonfinite_gradient_step_skipped_when_configured(results):
    r = scenario(results, "nonfinite")["grad_skip"]
    assert r["error"] is None
    records = r["records"]
    assert len(records) == 6 and all(math.isfinite(x["loss"]) for x in records)
    finite = [x["grad_norm"] is not None and math.isfinite(x["grad_norm"]) for x in records]  # JSON null: not finite
    assert finite == [True, True, False, True, True, True]
