"""The dashboard: widened narrow ranges, bias-corrected smoothing, resume markers on both x axes, a PNG drawn from
a resumed run with held-out losses and no gain timings."""
import json
import math

import pytest

from bbm.train.dashboard import padded_range, smoothed, write_dashboard, x_values


def test_narrow_ranges_are_widened():
    low, high = padded_range([0.750, 0.755])  # 5 MB of peak memory in GiB
    assert high - low >= 0.075 and low < 0.750 and high > 0.755
    low, high = padded_range([2.0, 6.0])  # a wide range keeps its span, plus a margin
    assert (low, high) == pytest.approx((1.8, 6.2))
    low, high = padded_range([0.0, 0.0])
    assert low < 0 < high


def test_smoothing_starts_at_the_first_value():
    assert smoothed([5.0])[0] == 5.0
    out = smoothed([1.0, 3.0] * 20)
    assert all(1.0 <= v <= 3.0 for v in out) and abs(out[-1] - out[-2]) < 2.0


def test_resume_markers_on_step_and_time_axes():
    records = [{"step": 10, "elapsed_s": 60.0}, {"step": 20, "elapsed_s": 120.0},
               {"step": 21, "elapsed_s": 126.0, "resumed_at": 20}]
    assert x_values(records, "step") == ([10, 20, 21], "optimizer step", [20])
    xs, label, marks = x_values(records, "time")
    assert xs == [1.0, 2.0, 2.1] and label == "training wall-clock (min)" and marks == [2.0]


@pytest.mark.parametrize("x", ["step", "time"])
def test_png_of_a_resumed_run(tmp_path, x):
    records = []
    for step in range(1, 61):
        loss = 2 + 3 * math.exp(-step / 20) + 0.1 * math.sin(step)
        r = {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1 + 0.2 * math.cos(step), "tokens_per_s": 1e4,
             "mfu": None, "peak_mem_gib": 0.75 + 0.005 * (step > 30), "elapsed_s": 2.0 * step, "device": "cpu",
             "attention": "bbm"}
        if step % 20 == 0:
            r.update(eval_loss=loss + 0.1, eval_ppl=math.exp(loss + 0.1))
        if step == 31:
            r["resumed_at"] = 30
        records.append(r)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = write_dashboard(tmp_path, x)
    assert out == tmp_path / "dashboard.png" and out.stat().st_size > 20_000
    with pytest.raises(ValueError, match=r"^x: expected one of \('step', 'time'\), got 'wall'"):
        write_dashboard(tmp_path, "wall")
