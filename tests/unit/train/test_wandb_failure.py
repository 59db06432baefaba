"""A W&B failure (at init, at a log, at the finish) costs one printed line and W&B, never the local metrics."""
import json
from types import SimpleNamespace

import pytest

from bbm.train.config import WandbConfig
from bbm.train.sink import MetricsSink


class Unreachable:
    """A W&B run whose service went away."""

    def __init__(self, tmp_path, fail_on):
        self.dir = str(tmp_path / "wandb" / "offline-run-x" / "files")
        self.fail_on = fail_on

    def log(self, *args, **kwargs):
        if self.fail_on == "log":
            raise ConnectionResetError(104, "Connection reset by peer")

    def finish(self):
        if self.fail_on == "finish":
            raise ConnectionResetError(104, "Connection reset by peer")


@pytest.mark.parametrize("fail_on", ["init", "log", "finish"])
def test_wandb_failure_leaves_local_metrics(tmp_path, monkeypatch, capsys, fail_on):
    import wandb

    def init(**kwargs):
        if fail_on == "init":
            raise wandb.errors.CommError("network is unreachable")
        return Unreachable(tmp_path, fail_on)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "Settings", lambda **kwargs: SimpleNamespace(**kwargs))
    sink = MetricsSink(tmp_path, WandbConfig(mode="offline"), {}, 0)
    for step in (1, 2):
        sink.log({"step": step, "loss": 1.0 / step})
    sink.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bbm train: W&B {fail_on} failed (")
    assert lines[0].endswith(f"W&B dropped, local metrics continue in {tmp_path / 'metrics.jsonl'}")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
