"""The plain log line and the evaluation line of a metrics record."""
from bbm.train.sink import duration, eval_line, log_line

RECORD = {"step": 40, "loss": 2.345678, "lr": 2.5e-3, "grad_norm": 0.98765, "tokens_per_s": 12345.6,
          "step_time_s": 0.1659, "mfu": 0.1234, "peak_mem_gib": 0.7512}


def test_log_line():
    assert log_line(RECORD, 300, 4000) == ("step  40/300 | loss 2.3457 | lr 2.50e-03 | grad norm 0.988 | 12,346 tok/s | "
                                           "166 ms/step | MFU 12.3% | peak mem 0.75 GiB | ETA 1h06m")


def test_unknown_values_are_dashes():
    line = log_line(dict(RECORD, mfu=None, grad_norm=float("nan")), 300, None)
    assert "| grad norm - |" in line and "| MFU - |" in line and line.endswith("| ETA -")


def test_eval_line_and_durations():
    record = dict(RECORD, eval_loss=2.5, eval_ppl=12.1825, eval_tokens=8192, eval_time_s=1.26)
    assert eval_line(record, 300) == "eval  40/300 | eval loss 2.5000 | eval ppl 12.18 | 8,192 held-out tokens | 1.3 s"
    assert [duration(s) for s in (0.4, 42, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]
