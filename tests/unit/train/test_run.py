"""A short CPU run through train.py, as a user starts one: the log line, train.log, config.yaml (a run started from
it reproduces the losses), the held-out loss falling, the closing summary (with and without a checkpoint), and
the trained model used through bbm.generate and bbm.export (a ZeRO-1 and a ZeRO-3 checkpoint)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bbm.export import export
from bbm.generate import main as generate_main
from bbm.model import build_mask
from bbm.trained import load_trained

REPO = Path(__file__).resolve().parents[3]
STEPS = 30
SHORT = [f"run.max_steps={STEPS}", "run.seq_len=128", "run.micro_batch_size=4", "data.max_documents=100",
         "data.eval_fraction=0.1", "eval.every=10", "eval.tokens=2048", "metrics.log_every=5", "metrics.gain_every=0",
         "schedule.warmup_steps=5", "checkpoint.every=0", "checkpoint.resume=none", "wandb.mode=disabled"]
LOG_LINE = re.compile(r"^step +(\d+)/30 \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| grad norm \d+\.\d{3} \| "
                      r"[\d,]+ tok/s \| [\d,]+ ms/step \| MFU \d+\.\d% \| peak mem \d+\.\d\d GiB \| ETA (-|\w+)$")
EVAL_LINE = re.compile(r"^eval +(\d+)/30 \| eval loss (\d+\.\d{4}) \| eval ppl \d+\.\d\d \| 2,048 held-out tokens "
                       r"\| \d+\.\d s$")


def train(*argv) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("runs")
    cache = f"data.cache_dir={work / 'data'}"
    first = train("--config", "tiny_cpu", *SHORT, cache, f"run.dir={work / 'first'}")
    # the config the first run wrote, run again elsewhere (without a checkpoint at the end)
    again = train("--config", work / "first" / "config.yaml", f"run.dir={work / 'again'}", "checkpoint.at_end=false")
    zero3 = train("--config", work / "first" / "config.yaml", f"run.dir={work / 'zero3'}", "deepspeed.zero_stage=3")
    return {"work": work, "first": first, "again": again, "zero3": zero3}


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_log_lines_on_stdout_and_in_train_log(runs):
    lines = runs["first"].splitlines()
    steps = [int(m.group(1)) for m in map(LOG_LINE.match, lines) if m]
    assert steps == [1, 5, 10, 15, 20, 25, 30], "\n".join(lines)
    assert [int(m.group(1)) for m in map(EVAL_LINE.match, lines) if m] == [10, 20, 30]
    assert lines[0].startswith("bbm train: ") and "eval every 10 steps on 4 held-out batches" in lines[0]
    log = (runs["work"] / "first" / "train.log").read_text()
    assert log == runs["first"]  # every line printed, and only those


def test_a_run_from_config_yaml_reproduces_the_losses(runs):
    first, again = records(runs["work"] / "first"), records(runs["work"] / "again")
    assert [r["loss"] for r in first] == [r["loss"] for r in again]
    assert [r.get("eval_loss") for r in first] == [r.get("eval_loss") for r in again]
    assert "vocab_size: 257" in (runs["work"] / "first" / "config.yaml").read_text()  # resolved


def test_held_out_loss_falls(runs):
    held_out = [(r["step"], r["eval_loss"], r["eval_ppl"]) for r in records(runs["work"] / "first") if "eval_loss" in r]
    assert [s for s, _, _ in held_out] == [10, 20, 30]
    losses = [loss for _, loss, _ in held_out]
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.3, losses
    assert all(ppl == pytest.approx(2.718281828 ** loss) for _, loss, ppl in held_out)


def test_closing_summary(runs):
    work = runs["work"]
    tail = runs["first"][runs["first"].index("bbm train: finished"):]
    assert re.search(r"; eval loss \d\.\d{3}, ppl \d+\.\d\d \(step 30\)", tail.splitlines()[0])
    assert f"  generate    python -m bbm.generate {work / 'first'} --prompt 'def '" in tail
    assert f"  export      python -m bbm.export {work / 'first'} {work / 'first' / 'export'}" in tail
    again = runs["again"][runs["again"].index("bbm train: finished"):]
    assert "  checkpoint  none written (checkpoint.at_end=false" in again and "None" not in again
    assert "generate" not in again and "export" not in again


def test_generate_and_export_from_the_run(runs, tmp_path, capsys):
    run = runs["work"] / "first"
    generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"])
    out = capsys.readouterr()
    assert out.out.startswith("def ") and re.search(r"\[\d+ tokens in ", out.err) and "step_00000030" in out.err
    trained = load_trained(run)
    exported = load_trained(export(run, tmp_path / "export"))
    tokens = torch.tensor(list(b"import os\nprint(os.getcwd())"))
    mask = build_mask(torch.zeros(1, len(tokens), dtype=torch.int32), "bbm")
    with torch.no_grad():
        want, got = (t.model.logits(tokens[None], torch.arange(len(tokens))[None], mask) for t in (trained, exported))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_zero3_checkpoint_reads_back_the_same_model(runs):
    """ZeRO-3 keeps each parameter in fp32 partitions; reassembled they are the model ZeRO-1 trained (on one CPU
    rank both do the same arithmetic, up to summation order)."""
    one = load_trained(runs["work"] / "first").model.state_dict()
    three = load_trained(runs["work"] / "zero3").model.state_dict()
    assert one.keys() == three.keys()
    for name in one:
        torch.testing.assert_close(three[name], one[name], rtol=1e-3, atol=1e-4, msg=name)
