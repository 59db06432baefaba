"""Multi-GPU runs of one preset through `deepspeed train.py`: data-parallel scaling (ZeRO-2 and ZeRO-3) and
Ulysses sequence parallelism, each against one GPU with the same global batch, on the same data.

    python benchmarks/multi_gpu.py                          # ~350M at 32k on every GPU of this machine
    python benchmarks/multi_gpu.py --gpus 4 --steps 20 data.tokenizer=/data/tokenizer.json

For each ZeRO stage: one GPU with gradient accumulation G, then G GPUs data parallel (accumulation 1); then G
GPUs splitting each sequence (sequence_parallel_size=G, accumulation G). All runs see the same sequences in
the same order, so their loss curves should agree (exactly up to bf16 reduction order). Prints tokens/s
(whole job), per GPU, scaling efficiency (tokens/s per GPU over the one-GPU run's), peak memory and the largest
loss difference from the one-GPU run; writes benchmarks/results/multi_gpu_<G>x<card>.json (e.g. multi_gpu_2xh200.json).
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bbm.train.sink import read_metrics
from common import environment, median_after, results_path, training_overrides, write_json  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]


def launch(name, gpus, overrides, args, workdir, port):
    """One `deepspeed --num_gpus gpus train.py` run -> its metrics.jsonl records (None if it failed)."""
    run_dir = Path(workdir) / name
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port", str(port),
           "train.py", "--config", args.config, *training_overrides(args.warmup + args.steps, run_dir),
           "metrics.gain_every=0", *overrides, *args.overrides]
    print(f"== {name}: {gpus} GPU(s) {' '.join(overrides)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"   timed out after {args.timeout} s", flush=True)
        return None
    records = read_metrics(run_dir)
    if proc.returncode != 0 or not records:
        print("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]), flush=True)
        return None
    return records


def summary(records, gpus, args, baseline):
    tokens = median_after(records, args.warmup, "tokens_per_s")
    row = {"gpus": gpus, "tokens_per_s": tokens, "tokens_per_s_per_gpu": tokens / gpus,
           "mfu": median_after(records, args.warmup, "mfu"),
           "peak_mem_gib": max(r["peak_mem_gib"] for r in records), "loss": [r["loss"] for r in records]}
    if baseline is not None:
        row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / baseline["tokens_per_s"]
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["loss"], baseline["loss"]))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt_350m_32k.yaml")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of the multi-GPU runs (0: all of this machine)")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages of the data-parallel runs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--port", type=int, default=29600, help="the first run's master port (then +1 a run)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/multi_gpu_<G>x<card>.json)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args()
    gpus = args.gpus or torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"--gpus: expected at least 2 GPUs for the multi-GPU runs, got {gpus}")
    rows = {}
    ports = iter(range(args.port, args.port + 100))  # a fresh one a run: no wait for the last run's socket
    with tempfile.TemporaryDirectory(prefix="bbm_multi_gpu_") as workdir:
        for stage in (int(s) for s in args.stages.split(",")):
            zero = f"deepspeed.zero_stage={stage}"
            one = launch(f"zero{stage}_1gpu", 1, [zero, f"deepspeed.gradient_accumulation_steps={gpus}"], args, workdir,
                         next(ports))
            base = summary(one, 1, args, None) if one else None
            rows[f"zero{stage}_1gpu"] = base
            many = launch(f"zero{stage}_dp{gpus}", gpus, [zero, "deepspeed.gradient_accumulation_steps=1"], args, workdir,
                          next(ports))
            rows[f"zero{stage}_dp{gpus}"] = summary(many, gpus, args, base) if many and base else None
            if stage == 2:  # Ulysses: every GPU holds 1/gpus of each sequence
                sp = launch(f"zero2_sp{gpus}", gpus, [zero, f"deepspeed.sequence_parallel_size={gpus}",
                                                       f"deepspeed.gradient_accumulation_steps={gpus}"], args, workdir,
                            next(ports))
                rows[f"zero2_sp{gpus}"] = summary(sp, gpus, args, base) if sp and base else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    env.update(gpus=gpus, deepspeed=__import__("deepspeed").__version__)
    print(f"\n{args.config}: {env}")
    print(f"{'run':<14} {'GPUs':>4} {'tokens/s':>9} {'per GPU':>8} {'efficiency':>10} {'MFU':>6} {'mem GiB':>8} "
          f"{'max |loss diff|':>15}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<14} failed")
            continue
        eff, diff = r.get("scaling_efficiency"), r.get("max_loss_diff")
        print(f"{name:<14} {r['gpus']:>4} {r['tokens_per_s']:>9.0f} {r['tokens_per_s_per_gpu']:>8.0f} "
              f"{'-' if eff is None else format(eff, '.2f'):>10} {'-' if r['mfu'] is None else format(r['mfu'], '.3f'):>6} "
              f"{r['peak_mem_gib']:>8.1f} {'-' if diff is None else format(diff, '.4f'):>15}")
    out = Path(args.out) if args.out else results_path("multi_gpu", device, gpus)
    write_json(out, {"config": args.config, "overrides": args.overrides, "environment": env,
                     "warmup": args.warmup, "steps": args.steps, "rows": rows})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
