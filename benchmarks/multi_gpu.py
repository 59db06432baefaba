"""Multi-GPU scaling of one preset through train.py: data parallel with ZeRO-2 and ZeRO-3, and Ulysses sequence
parallelism (ZeRO-2, sequence_parallel_size = G), on 1, 2, 4 and 8 GPUs where the machine has them.

    python benchmarks/multi_gpu.py                                  # ~350M at 32k, every power of two of GPUs here
    python benchmarks/multi_gpu.py --gpus 1,2,4 --modes zero2,sp --profile data.tokenizer=/data/tokenizer.json
    python benchmarks/multi_gpu.py --device cpu --gpus 1,2 --config configs/tiny_cpu.yaml     # gloo, CPU ranks
    python benchmarks/multi_gpu.py --warmup 4 --steps 8 --log-every 4    # a metrics record every 4 steps
    python benchmarks/multi_gpu.py --dry-run                        # print the plan's commands only

One-GPU runs are ``python train.py``; G-GPU runs ``deepspeed --num_gpus G train.py``. Per ZeRO stage the plan has
one-GPU baselines accumulating 1 and G micro-batches per step (for every G), then per G: data parallel (each rank
one micro-batch a step) and, for ZeRO-2, sequence parallel (every rank holds 1/G of each sequence, G micro-batches
a step). Every run reads the same sequences in the same order. Efficiency is tokens/s per GPU over a one-GPU
run's tokens/s, by two definitions, both printed:

* same global batch: the one-GPU run takes as many sequences per optimizer step as the G-GPU run (it accumulates
  G micro-batches), so both train the same model on the same data and their loss curves must agree (the table's
  loss column: the largest difference over the records of the warm-up and timed steps); the one-GPU run amortises
  its optimizer step over G micro-batches;
* same per-GPU batch: the one-GPU run processes as many tokens per optimizer step as each GPU of the G-GPU run
  (one micro-batch a step; under sequence parallelism each GPU's G micro-steps of 1/G of a sequence), so every GPU
  amortises its optimizer step over the same work.

A metrics record (two all-reduces, a device sync, rank 0 writing a line) comes every ``--log-every`` steps: 1 (the
default) compares the losses step by step; 4 or 10 time the steps as training with the presets' logging does.

``--profile`` runs two more steps after the timed ones under ``metrics.profile_steps`` on every rank and keeps the
head of each rank's table (on a GPU: kernel time by kind, communication included, GPU busy time, and the host and
GPU-idle time per phase of the step) in the results. Results: ``benchmarks/results/multi_gpu_<card>x<G>.json``.
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from bbm.distributed.ulysses import kv_replication
from bbm.train.config import load_config
from bbm.train.env import free_port
from bbm.train.sink import read_metrics
from common import RESULTS, card_tag, environment, training_overrides, write_json  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]
MODES = ("zero2", "zero3", "sp")
PROFILED_STEPS = 2


@dataclass
class Run:
    name: str
    gpus: int
    stage: int
    accum: int
    sp: int = 1

    @property
    def overrides(self) -> List[str]:
        return [f"deepspeed.zero_stage={self.stage}", f"deepspeed.gradient_accumulation_steps={self.accum}",
                f"deepspeed.sequence_parallel_size={self.sp}"]

    def baselines(self):
        """(same global batch, same per-GPU batch) one-GPU runs this run is compared with, by name."""
        return baseline_name(self.stage, self.gpus if self.sp == 1 else self.accum), baseline_name(self.stage, 1)


def baseline_name(stage: int, accum: int) -> str:
    return f"zero{stage}_1gpu_accum{accum}"


def plan(counts: List[int], modes: List[str], n_heads: int, kv_heads: int):
    """The runs for these GPU counts and modes, baselines first; and the skipped ones with the reason."""
    multi = [g for g in counts if g > 1]
    stages = sorted({3 if m == "zero3" else 2 for m in modes})
    runs, skipped = [], []
    for stage in stages:
        for accum in sorted({1, *multi}):
            runs.append(Run(baseline_name(stage, accum), 1, stage, accum))
        for g in multi:
            if f"zero{stage}" in modes:
                runs.append(Run(f"zero{stage}_dp{g}", g, stage, 1))
            if stage == 2 and "sp" in modes:
                try:
                    kv_replication(n_heads, kv_heads, g)
                    runs.append(Run(f"zero2_sp{g}", g, 2, g, sp=g))
                except ValueError as e:
                    skipped.append((f"zero2_sp{g}", str(e)))
    return runs, skipped


def command(run: Run, args, run_dir: Path, port: int) -> List[str]:
    steps = args.warmup + args.steps + (PROFILED_STEPS if args.profile else 0)
    overrides = [*training_overrides(steps, run_dir), f"metrics.log_every={args.log_every}", "metrics.gain_every=0",
                 f"run.device={args.device}", *run.overrides]
    if args.profile:
        first = args.warmup + args.steps + 1
        overrides.append(f"metrics.profile_steps=[{first},{first + PROFILED_STEPS - 1}]")
    return [*launcher(run.gpus, port), "--config", args.config, *overrides, *args.overrides]


def launcher(gpus: int, port: int) -> List[str]:
    """How train.py starts on ``gpus`` GPUs: one process as it is, several through DeepSpeed's launcher."""
    if gpus == 1:
        return [sys.executable, "train.py"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port", str(port),
            "train.py"]


def run_command(cmd: List[str], timeout: int):
    """(exit status, or None if it ran past ``timeout`` seconds; its output) of a command run from the repository
    root in a session of its own: on a timeout or an interruption the launcher, its ranks and their workers are
    all killed, so that none keeps holding a GPU."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def execute(run: Run, cmd: List[str], run_dir: Path, timeout: int) -> Optional[list]:
    """Runs one command -> its metrics.jsonl records (None if it failed or timed out)."""
    print(f"== {run.name}: {run.gpus} GPU(s), {' '.join(run.overrides)}", flush=True)
    status, output = run_command(cmd, timeout)
    records = read_metrics(run_dir)
    if status is None:
        print(f"   timed out after {timeout} s", flush=True)
        return None
    if status != 0 or not records:
        print("\n".join(output.strip().splitlines()[-15:]), flush=True)
        return None
    return records


def profile_heads(run_dir: Path, lines: int = 24) -> dict:
    """The head of each rank's profile table (the summary a GPU profile starts with), by rank file name."""
    tables = sorted((run_dir / "profile").glob("ops_rank*.txt"))
    return {p.stem: "\n".join(p.read_text().splitlines()[:lines]) for p in tables}


def summary(run: Run, records, args) -> dict:
    """Medians over the records of the timed steps (each covers ``--log-every`` steps); the losses of the records
    of the warm-up and timed steps."""
    starts = [0] + [r["step"] for r in records[:-1]]  # a record covers the steps after the one before it
    timed = [r for r, first in zip(records, starts) if first >= args.warmup and r["step"] <= args.warmup + args.steps]
    if not timed:
        return {"gpus": run.gpus, "error": f"no record of the timed steps {args.warmup + 1}-{args.warmup + args.steps}"}
    tokens = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"gpus": run.gpus, "zero_stage": run.stage, "accumulation": run.accum, "sequence_parallel": run.sp,
            "tokens_per_s": tokens, "tokens_per_s_per_gpu": tokens / run.gpus,
            "step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
            "loss": [r["loss"] for r in records if r["step"] <= args.warmup + args.steps]}


def compare(run: Run, row: dict, rows: dict):
    """Adds both efficiencies and the loss difference from the same-global-batch baseline."""
    same_global, same_per_gpu = (rows.get(name) for name in run.baselines())
    if same_global and "tokens_per_s" in same_global:
        row["efficiency_same_global_batch"] = row["tokens_per_s_per_gpu"] / same_global["tokens_per_s"]
        pairs = list(zip(row["loss"], same_global["loss"]))
        row["max_loss_diff"] = max(abs(a - b) for a, b in pairs) if pairs else None
        row["loss_records_compared"] = len(pairs)
    if same_per_gpu and "tokens_per_s" in same_per_gpu:
        row["efficiency_same_per_gpu_batch"] = row["tokens_per_s_per_gpu"] / same_per_gpu["tokens_per_s"]


def topology() -> Optional[str]:
    """``nvidia-smi topo -m`` (how the GPUs are linked: NVLink, PCIe), where there is one."""
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(runs: List[Run], rows: dict, skipped) -> str:
    lines = [f"{'run':<20} {'GPUs':>4} {'accum':>5} {'tokens/s':>10} {'per GPU':>9} {'eff global':>10} "
             f"{'eff per-GPU':>11} {'MFU':>6} {'peak GiB':>8} {'max |loss diff|':>15}"]
    for run in runs:
        r = rows.get(run.name)
        if r is None or "tokens_per_s" not in r:
            lines.append(f"{run.name:<20} {run.gpus:>4} {run.accum:>5} failed{': ' + r['error'] if r else ''}")
            continue
        lines.append(f"{run.name:<20} {run.gpus:>4} {run.accum:>5} {r['tokens_per_s']:>10.0f} "
                     f"{r['tokens_per_s_per_gpu']:>9.0f} {fmt(r.get('efficiency_same_global_batch'), '.3f'):>10} "
                     f"{fmt(r.get('efficiency_same_per_gpu_batch'), '.3f'):>11} {fmt(r['mfu'], '.3f'):>6} "
                     f"{r['peak_mem_gib']:>8.1f} {fmt(r.get('max_loss_diff'), '.2e'):>15}")
    lines += [f"{name:<20} skipped: {why}" for name, why in skipped]
    lines.append("eff global: tokens/s per GPU over the one-GPU run with the same global batch (it accumulates the "
                 "G runs' micro-batches per step); eff per-GPU: over the one-GPU run with the same tokens per GPU per "
                 "optimizer step (one micro-batch a step). Loss diff: against the same-global-batch run, over the "
                 "records of the warm-up and timed steps (loss_records_compared in the results).")
    return "\n".join(lines)


def gpu_counts(text: Optional[str], device: str) -> List[int]:
    """The GPU counts given, or 1, 2, 4, 8 up to this machine's GPUs (CPU: 1, 2 ranks)."""
    if text is None:
        have = torch.cuda.device_count() if device == "cuda" else 2
        return [g for g in (1, 2, 4, 8) if g <= have]
    counts = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) == 0:
            raise SystemExit(f"--gpus: expected positive GPU counts separated by commas, got {text!r}")
        counts.append(int(part))
    if device == "cuda" and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--gpus: expected at most the {torch.cuda.device_count()} GPUs of this machine, got {text!r}")
    return sorted(set(counts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt_350m_32k.yaml")
    ap.add_argument("--gpus", help="GPU counts, e.g. 1,2,4,8 (default: 1, 2, 4, 8 up to this machine's GPUs)")
    ap.add_argument("--modes", default="zero2,zero3,sp", help=f"comma-separated, among {', '.join(MODES)}")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--log-every", type=int, default=1,
                    help="steps per metrics record (and per loss compared); it must divide --warmup and --steps")
    ap.add_argument("--profile", action="store_true", help="profile 2 more steps on every rank (see above)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/multi_gpu_<card>x<G>[_<tag>].json)")
    ap.add_argument("--tag", help="suffix of the default JSON name, for a variant (e.g. no_overlap)")
    ap.add_argument("--keep", help="keep the run directories (metrics, profiles, traces) under this directory")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args(argv)
    if args.log_every <= 0 or args.warmup % args.log_every or args.steps % args.log_every:
        raise SystemExit(f"--log-every: expected a divisor of --warmup {args.warmup} and --steps {args.steps}, got "
                         f"{args.log_every}")
    modes = args.modes.split(",")
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: expected some of {MODES} separated by commas, got {args.modes!r}")
    counts = gpu_counts(args.gpus, args.device)
    cfg = load_config(REPO / args.config, args.overrides)
    runs, skipped = plan(counts, modes, cfg.model.n_heads, cfg.model.kv_heads)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bbm_multi_gpu_"))
    commands = {run.name: command(run, args, workdir / run.name, free_port()) for run in runs}
    if args.dry_run:
        if not args.keep:
            workdir.rmdir()
        for run in runs:
            print(" ".join(commands[run.name]))
        return {"runs": runs, "skipped": skipped, "commands": commands}
    rows = {}
    try:
        for run in runs:
            records = execute(run, commands[run.name], workdir / run.name, args.timeout)
            rows[run.name] = summary(run, records, args) if records else None
            if rows[run.name] is not None and run.gpus > 1:
                compare(run, rows[run.name], rows)
            if rows[run.name] is not None and args.profile:
                rows[run.name]["profile"] = profile_heads(workdir / run.name)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    env = environment(torch.device(args.device))
    import deepspeed

    env.update(gpus=max(counts), deepspeed=deepspeed.__version__, topology=topology(),
               nccl=".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None)
    print(f"\n{args.config} {' '.join(args.overrides)}: {env['card']}, torch {env['torch']}, deepspeed "
          f"{env['deepspeed']}; {args.warmup} warm-up + {args.steps} timed steps, a record every {args.log_every}, "
          "medians over the timed records")
    print(table(runs, rows, skipped))
    name = "_".join(["multi_gpu", card_tag(torch.device(args.device), max(counts))] + ([args.tag] if args.tag else []))
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    write_json(out, {"config": args.config, "overrides": args.overrides, "environment": env, "warmup": args.warmup,
                     "steps": args.steps, "log_every": args.log_every, "definitions": {
                         "efficiency_same_global_batch": "tokens/s per GPU over the one-GPU run that accumulates the "
                                                         "G-GPU run's sequences per step",
                         "efficiency_same_per_gpu_batch": "tokens/s per GPU over the one-GPU run with one micro-batch "
                                                          "a step (each GPU's tokens per optimizer step)"},
                     "skipped": dict(skipped), "rows": rows})
    print(f"\nwritten {out}")
    return rows


if __name__ == "__main__":
    main()
