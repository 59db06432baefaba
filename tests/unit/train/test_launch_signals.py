"""SIGTERM to launch/single_node.sh with 2 CPU ranks (gloo): every rank stops at a step boundary, they save one
checkpoint together, rank 0 writes its summary and dashboard, no process is left, and the script exits 143."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from bbm.train import manifest
from bbm.train.env import free_port

REPO = Path(__file__).resolve().parents[3]
OVERRIDES = ["run.device=cpu", "run.seq_len=64", "run.micro_batch_size=2", "run.max_steps=100000", "model.dim=32",
             "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.max_documents=20",
             "metrics.log_every=1", "metrics.gain_every=0", "metrics.progress_bar=false", "wandb.mode=disabled",
             "checkpoint.every=0", "checkpoint.resume=none"]


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_to_the_launch_script_saves_on_every_rank_and_exits_143(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, NUM_GPUS="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1")
    script = subprocess.Popen(["bash", "launch/single_node.sh", "configs/tiny_cpu.yaml", *OVERRIDES,
                               f"data.cache_dir={tmp_path / 'data'}", f"run.dir={run_dir}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while steps_logged(run_dir) < 2 and script.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = psutil.Process(script.pid).children(recursive=True)
        assert len([p for p in ranks if "train.py" in " ".join(p.cmdline())]) == 2
        script.send_signal(signal.SIGTERM)
        out, _ = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 143, out[-4000:]
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a rank outlived the run"
    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text()
    assert manifest.problem(root / tag) is None
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(manifest.read(root / tag)["files"])
    step = json.loads((root / tag / "state.json").read_text())["step"]
    assert f"bbm train: stopped by signal 15 at step {step} (exit code 143)" in out
    assert (run_dir / "dashboard.png").is_file() and steps_logged(run_dir) == step
