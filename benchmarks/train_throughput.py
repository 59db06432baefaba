"""Training throughput of one preset with each attention backend, on the same data, through the real trainer
(DeepSpeed engine, AdamW, bf16): tokens/s, TFLOP/s and MFU (allowed pairs, and the dense N^2 convention).

    python benchmarks/train_throughput.py                                   # ~350M at 32k, all four backends
    python benchmarks/train_throughput.py --config configs/gpt_125m_16k.yaml --backends bbm,flex
    python benchmarks/train_throughput.py --backends bbm,bbm:triton,flex      # NAME:PATH forces bbm.attention's path

Each backend trains in its own child process (a hung compile or an out-of-memory stays there) for
--warmup + --steps optimizer steps of one 32k sequence each. Steps differ with their batch's documents (the
same batches for every backend), so the rates are over the timed steps as a whole (their total work over their
total time) and the step time is their mean; the attention gain is fwd+bwd of one layer's attention vs dense
causal SDPA on the last batch.
Results: --out (default benchmarks/results/train_throughput_<card>.json) and a table on stdout.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("bbm", "flex", "sdpa_masked", "sdpa_causal")
RATE_KEYS = ("tokens_per_s", "tflops", "mfu", "tflops_dense_convention", "mfu_dense_convention")


def child(args):
    """Trains one backend and writes its summary to args.out."""
    from bbm.train import Trainer, load_config
    from bbm.train.sink import read_metrics
    from common import training_overrides  # benchmarks/common.py

    total = args.warmup + args.steps
    attention, _, path = args.child.partition(":")
    overrides = [f"model.attention={attention}", f"model.bbm_backend={path or 'auto'}",
                 *training_overrides(total, Path(args.workdir) / args.child.replace(":", "_")),
                 f"metrics.gain_every={total}", "deepspeed.gradient_accumulation_steps=1", *args.overrides]
    trainer = Trainer(load_config(args.config, overrides))
    trainer.train()
    records = read_metrics(trainer.run_dir)
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = sum(r["step_time_s"] for r in timed)  # a record per step
    row = {k: None if timed[0][k] is None else sum(r[k] * r["step_time_s"] for r in timed) / seconds
           for k in RATE_KEYS}
    row["step_time_s"] = seconds / len(timed)
    row.update({k: records[-1].get(k) for k in ("attention_ms", "dense_causal_ms", "gain_vs_dense")})
    row.update(attention_density=statistics.mean(r["attention_density"] for r in timed),
               peak_mem_gib=records[-1]["peak_mem_gib"], loss_first=records[0]["loss"], loss_last=records[-1]["loss"],
               params=trainer.matmul_params, seq_len=trainer.cfg.run.seq_len, steps_timed=len(timed),
               step_times_s=[r["step_time_s"] for r in timed])
    Path(args.out).write_text(json.dumps(row))


def run_backend(args, backend: str, workdir: str) -> dict:
    out = Path(workdir) / f"{backend.replace(':', '_')}.json"
    cmd = [sys.executable, __file__, "--child", backend, "--out", str(out), "--workdir", workdir, "--config", args.config,
           "--warmup", str(args.warmup), "--steps", str(args.steps), *args.overrides]
    print(f"== {backend}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        errors = [line for line in tail if "Error" in line]
        return {"error": (errors or tail or [f"exit {proc.returncode}"])[-1]}
    return json.loads(out.read_text())


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "gpt_350m_32k.yaml"))
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="model.attention values; bbm:PATH also sets model.bbm_backend=PATH (e.g. bbm:triton)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per backend")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="results JSON (default benchmarks/results/train_throughput_<card>.json)")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every backend")
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch
    from common import environment, results_path, write_json  # benchmarks/common.py

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bbm_throughput_") as workdir:
        for backend in args.backends.split(","):
            rows[backend] = run_backend(args, backend, workdir)
    env = environment(device)
    import deepspeed

    env["deepspeed"] = deepspeed.__version__
    base = rows.get("bbm", {}).get("tokens_per_s")
    print(f"\n{Path(args.config).name}: {env}")
    print(f"{'backend':<12} {'tokens/s':>10} {'step s':>7} {'TFLOP/s':>8} {'MFU':>6} {'TFLOP/s N^2':>12} {'MFU N^2':>8} "
          f"{'attn gain':>9} {'mem GiB':>8} {'bbm x':>6}")
    for backend, r in rows.items():
        if "error" in r:
            print(f"{backend:<12} failed: {r['error']}")
            continue
        speed = base / r["tokens_per_s"] if base else None
        print(f"{backend:<12} {r['tokens_per_s']:>10.0f} {r['step_time_s']:>7.3f} {fmt(r['tflops']):>8} "
              f"{fmt(r['mfu'], '.3f'):>6} {fmt(r['tflops_dense_convention']):>12} {fmt(r['mfu_dense_convention'], '.3f'):>8} "
              f"{fmt(r['gain_vs_dense'], '.2f'):>9} {r['peak_mem_gib']:>8.1f} {fmt(speed, '.2f'):>6}")
    out = Path(args.out) if args.out else results_path("train_throughput", device)
    write_json(out, {"config": Path(args.config).name, "overrides": args.overrides, "environment": env,
                     "warmup": args.warmup, "steps": args.steps, "rows": rows})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
