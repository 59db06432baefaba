"""Multi-node launch, simulated on one machine: two DeepSpeed launchers started independently (``deepspeed
--hostfile H --no_ssh --node_rank r``, how a scheduler starts each node without ssh; launch/multi_node.sh runs
the same launcher over ssh), one CPU rank each, gloo, rendezvous on 127.0.0.1, train the tiny preset exactly as
one process accumulating both ranks' micro-batches. And the SLURM path (launch/slurm.sbatch: srun starts
train.py, which takes its rank from SLURM's variables)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bbm.train.env import free_port, set_rank_variables
from helpers.processes import REPO

TINY = ["--config", "configs/tiny_cpu.yaml", "run.seq_len=128", "run.micro_batch_size=1", "run.max_steps=3",
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.max_documents=40",
        "optimizer.lr=1e-2", "schedule.warmup_steps=0", "metrics.log_every=1", "metrics.gain_every=0",
        "metrics.progress_bar=false", "wandb.mode=disabled", "checkpoint.at_end=false", "checkpoint.resume=none",
        "deepspeed.zero_stage=2"]


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def test_two_nodes_train_as_one_process(tmp_path):
    common = [*TINY, f"data.cache_dir={tmp_path / 'data'}"]
    one = subprocess.run([sys.executable, "train.py", *common, "deepspeed.gradient_accumulation_steps=2",
                          f"run.dir={tmp_path / 'one'}"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "train.py", *common, f"run.dir={tmp_path / 'two_nodes'}"],
                              cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "2 x cpu" in outputs[0] and "'node0': [0], 'node1': [1]" in outputs[1]  # one world of two nodes
    two = records(tmp_path / "two_nodes")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(records(tmp_path / "one"), two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_slurm_task_variables_make_the_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.setenv(key, "")  # recorded, so that what set_rank_variables writes is undone after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-001")
    set_rank_variables()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_PORT"] == "29500"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        set_rank_variables()
