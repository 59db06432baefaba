"""The longest context that trains, per GPU count: a search on seq_len over real training steps of train.py (one
process per probe: ``python train.py`` on one GPU, ``deepspeed --num_gpus G train.py`` on G), beside the memory
model's prediction (``bbm.distributed.memory``).

    python benchmarks/longest_context.py                                   # 125M and 1B presets, 1..8 GPUs here
    python benchmarks/longest_context.py --configs configs/gpt_125m_16k.yaml --gpus 4 --start 1048576
    python benchmarks/longest_context.py --dry-run                         # the first probe's command per count

Each probe trains ``--steps`` optimizer steps (the second one runs with AdamW's states allocated) of one sequence
per micro-batch with activation checkpointing, on G GPUs laid out as the memory model lays them out (sequence
parallel over as many of them as split the heads: sp = G where it can). A probe fits when the run finishes; it
fails when any rank runs out of memory; a probe past ``--timeout`` counts as too slow to train (recorded apart);
any other failure stops the search for that count and prints its output. The search starts at the memory
model's prediction, calibrated on the first limit of the config measured (in this invocation or an earlier one),
steps by ``--grow`` until it brackets the limit, then bisects down to ``--granularity`` tokens. Results accumulate
(per config and GPU count) in ``benchmarks/results/longest_context_<card>x<GPUs of the machine>.json``, so counts can be measured in separate
invocations; the table prints measured against predicted, and the ``python -m bbm.train.memory`` line that
calibrates the model on a measurement.
"""
import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import torch

from bbm.distributed.memory import GIB, calibrate, layout, max_context
from bbm.train.config import load_config
from bbm.train.env import free_port
from bbm.train.memory import dims_from_config, setup_from_config
from bbm.train.sink import read_metrics
from common import environment, results_path, training_overrides, write_json  # benchmarks/common.py
from multi_gpu import gpu_counts, launcher, run_command

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "configs/gpt_125m_16k.yaml,configs/gpt_1b_64k.yaml"
OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "MemoryError")
FITS, OOM, TIMEOUT, ERROR = "fits", "out of memory", "timeout", "error"


def search(probe: Callable[[int], str], start: int, granularity: int, upper: int, grow: float = 1.25, known=()):
    """The longest multiple of ``granularity`` up to ``upper`` for which ``probe(n)`` returns ``FITS``: from
    ``start``, multiply (fits) or divide (does not) by ``grow`` until the limit is bracketed, then bisect.
    ``known``: (n, outcome) pairs of an interrupted search, which it continues from. Returns (longest fit or None,
    shortest failure or None, [(n, outcome)] known and new, in probe order); an ``ERROR`` outcome ends it."""
    top = upper // granularity * granularity

    def down(x):
        return min(top, max(granularity, int(x) // granularity * granularity))

    def grown(n):
        return min(top, max(down(n * grow), n + granularity))

    def shrunk(n):
        return max(granularity, min(down(n / grow), n - granularity))

    probes = [(n, outcome) for n, outcome in known if outcome != ERROR]
    fit = max((n for n, outcome in probes if outcome == FITS), default=None)
    fail = min((n for n, outcome in probes if outcome != FITS and (fit is None or n > fit)), default=None)
    n = grown(fit) if fit is not None else shrunk(fail) if fail is not None else down(start)
    while fit is None or fail is None:
        if (fit is not None and n == fit) or (fail is not None and n == fail):
            break  # at the top (fits) or at the granularity (does not)
        outcome = probe(n)
        probes.append((n, outcome))
        if outcome == ERROR:
            return fit, fail, probes
        if outcome == FITS:
            fit, n = n, grown(n)
        else:
            fail, n = n, shrunk(n)
    while fit is not None and fail is not None and fail - fit > granularity:
        n = max(fit + granularity, down((fit + fail) // 2))
        outcome = probe(n)
        probes.append((n, outcome))
        if outcome == ERROR:
            break
        if outcome == FITS:
            fit = n
        else:
            fail = n
    return fit, fail, probes


def classify(status: Optional[int], output: str) -> str:
    """A probe's outcome from its exit status (None: timed out) and output."""
    if status == 0:
        return FITS
    if status is None:
        return TIMEOUT
    return OOM if any(m in output for m in OOM_MARKERS) else ERROR


class Prober:
    """Probes one config on ``gpus`` GPUs (dp x sp), keeps what each probe measured, by sequence length, and calls
    ``on_probe()`` after each."""

    def __init__(self, config: str, gpus: int, sp: int, args, workdir: Path, measured=None, on_probe=None):
        self.config, self.gpus, self.sp, self.args, self.workdir = config, gpus, sp, args, workdir
        self.measured = dict(measured or {})
        self.on_probe = on_probe

    def run_dir(self, n: int) -> Path:
        return self.workdir / f"{Path(self.config).stem}_g{self.gpus}_n{n}"

    def command(self, n: int) -> List[str]:
        overrides = [*training_overrides(self.args.steps, self.run_dir(n)), "metrics.gain_every=0",
                     f"run.device={self.args.device}", f"run.seq_len={n}", "run.micro_batch_size=1",
                     "deepspeed.gradient_accumulation_steps=1", "deepspeed.activation_checkpointing=true",
                     f"deepspeed.sequence_parallel_size={self.sp}"]
        return [*launcher(self.gpus, free_port()), "--config", self.config, *overrides, *self.args.overrides]

    def __call__(self, n: int) -> str:
        status, output = run_command(self.command(n), self.args.timeout)
        records = read_metrics(self.run_dir(n))
        outcome = classify(status, output)
        if outcome == FITS and (not records or records[-1]["step"] != self.args.steps):
            outcome = ERROR
        peak = max((r["peak_mem_gib"] for r in records), default=None)
        step_s = records[-1]["step_time_s"] if records else None
        self.measured[n] = {"outcome": outcome, "peak_mem_gib": peak, "step_time_s": step_s}
        fitted = f", peak {peak:.1f} GiB, step {step_s:.1f} s" if outcome == FITS else ""
        print(f"   {n:>10,} tokens: {outcome}{fitted}", flush=True)
        if outcome == ERROR:
            print("\n".join(output.strip().splitlines()[-20:]), flush=True)
        if self.on_probe is not None:
            self.on_probe()
        return outcome


def load_rows(path: Path) -> list:
    """Rows of earlier invocations on this machine (a file of this script's format), else none."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("rows", [])
    return [r for r in rows if isinstance(r, dict) and "config" in r and "gpus" in r]


def format_table(rows) -> str:
    lines = ["| config | GPUs | dp x sp | predicted | predicted, calibrated | measured longest | first failing | "
             "peak GiB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def k(x):
            return "-" if x is None else f"{x:,} ({x // 1024}k)"
        name = Path(r["config"]).stem + ("" if r.get("complete") else " (unfinished)")
        lines.append(f"| {name} | {r['gpus']} | {r['dp']} x {r['sp']} | {k(r['predicted'])} | "
                     f"{k(r.get('predicted_calibrated'))} | {'' if r['first_failing'] else '>= '}{k(r['longest'])} | "
                     f"{k(r['first_failing'])} "
                     f"{'(' + r['failure'] + ')' if r['failure'] else ''} | "
                     f"{'-' if r['peak_mem_gib'] is None else format(r['peak_mem_gib'], '.1f')} | "
                     f"{'-' if r['step_time_s'] is None else format(r['step_time_s'], '.1f')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=CONFIGS, help=f"comma-separated presets (default {CONFIGS})")
    ap.add_argument("--gpus", help="GPU counts, e.g. 1,2,4,8 (default: 1, 2, 4, 8 up to this machine's GPUs)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps a probe trains")
    ap.add_argument("--granularity", type=int, default=16384, help="tokens the search resolves")
    ap.add_argument("--max-seq", type=int, default=1 << 23, help="longest sequence probed")
    ap.add_argument("--start", type=int, help="first probe (default: the memory model's prediction)")
    ap.add_argument("--grow", type=float, default=1.25, help="factor between probes until the limit is bracketed")
    ap.add_argument("--gpu-gib", type=float, help="GPU memory for the prediction (default: this GPU's)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per probe")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/longest_context_<card>x<GPUs>.json)")
    ap.add_argument("--redo", action="store_true", help="measure counts the results file has finished again")
    ap.add_argument("--dry-run", action="store_true", help="print the first probe's command per count and exit")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every probe")
    args = ap.parse_args(argv)
    if args.granularity <= 0 or args.granularity % 8:
        raise SystemExit(f"--granularity: expected a positive multiple of 8 (every sequence-parallel size), got "
                         f"{args.granularity}")
    if args.grow <= 1:
        raise SystemExit(f"--grow: expected a factor above 1, got {args.grow}")
    counts = gpu_counts(args.gpus, args.device)
    here_gib = torch.cuda.get_device_properties(0).total_memory / GIB if args.device == "cuda" else 80.0
    gpu_gib = args.gpu_gib or here_gib
    here = torch.cuda.device_count() if args.device == "cuda" else max(counts)
    out = Path(args.out) if args.out else results_path("longest_context", torch.device(args.device), here)
    rows = load_rows(out)
    with tempfile.TemporaryDirectory(prefix="bbm_longest_") as workdir:
        plans = measure(args, counts, gpu_gib, Path(workdir), out, rows)
    if args.dry_run:
        return plans
    print(format_table(rows))
    for r in rows:
        if r["longest"] and r["first_failing"]:
            print(f"calibrate: python -m bbm.train.memory --config {r['config']} --sp max "
                  f"deepspeed.activation_checkpointing=true --gpu-gib {r['gpu_gib']:.0f} "
                  f"--measured {r['gpus']}:{r['longest']}")
    print(f"\nwritten {out}")
    return rows


def measure(args, counts, gpu_gib: float, workdir: Path, out: Path, rows: list) -> list:
    """Searches every config on every count; ``rows`` and the file are updated after every probe (a count left
    unfinished continues from its probes on the next invocation; a finished one is skipped unless --redo). With
    --dry-run only prints the first probe's command of each and returns the (config, gpus, dp, sp, prober) plans."""
    plans = []
    env = environment(torch.device(args.device))
    for config in args.configs.split(","):
        cfg = load_config(REPO / config, ["deepspeed.activation_checkpointing=true", "run.micro_batch_size=1",
                                          *args.overrides])  # as the probes train
        dims = dims_from_config(cfg)
        setup = setup_from_config(cfg, "max", gpu_gib)
        for gpus in counts:
            key = (config, gpus, args.overrides)
            earlier = next((r for r in rows if (r["config"], r["gpus"], r.get("overrides")) == key), None)
            if earlier is not None and earlier.get("complete") and not args.redo:
                print(f"== {config}: {gpus} GPU(s) measured earlier, in {out} (--redo measures it again)")
                continue
            bracketed = [r for r in rows if (r["config"], r.get("overrides")) == (config, args.overrides)
                         and r["longest"] and r["first_failing"]]  # calibrates the start
            scale = calibrate(dims, bracketed[0]["gpus"], bracketed[0]["longest"], setup) if bracketed else None
            dp, sp = layout(gpus, dims.n_heads, dims.kv_heads)
            predicted = max_context(dims, gpus, setup)["max_context"]
            calibrated = max_context(dims, gpus, setup, scale)["max_context"] if scale else None
            known = [] if earlier is None or args.redo else earlier["probes"]
            row = {"config": config, "overrides": args.overrides, "gpus": gpus, "dp": dp, "sp": sp,
                   "predicted": predicted, "predicted_calibrated": calibrated, "granularity": args.granularity,
                   "max_seq": args.max_seq, "gpu_gib": gpu_gib}
            prober = Prober(config, gpus, sp, args, workdir, {p["n"]: p for p in known},
                            on_probe=lambda: record(row, prober, rows, out, env))
            start = args.start or calibrated or predicted
            if args.dry_run:
                print(" ".join(prober.command(max(args.granularity, start // args.granularity * args.granularity))))
                plans.append((config, gpus, dp, sp, prober))
                continue
            print(f"== {config}: {gpus} GPU(s) (dp {dp} x sp {sp}), predicted {predicted:,} tokens"
                  + (f", calibrated {calibrated:,}" if calibrated else "")
                  + (f", continuing from {len(known)} probes" if known else ""), flush=True)
            longest, failing, probes = search(prober, start, args.granularity, args.max_seq, args.grow,
                                              [(p["n"], p["outcome"]) for p in known])
            record(row, prober, rows, out, env, longest, failing, probes)
    return plans


def record(row: dict, prober: Prober, rows: list, out: Path, env: dict, longest=None, failing=None, probes=None):
    """Puts ``row`` in ``rows`` (replacing its config and count) and rewrites the results: after a probe with what
    the search has so far (``complete`` false), at its end with the limit."""
    done = probes is not None
    if not done:
        fits = [n for n, m in prober.measured.items() if m["outcome"] == FITS]
        longest = max(fits, default=None)
        failing = min((n for n, m in prober.measured.items() if m["outcome"] in (OOM, TIMEOUT)
                       and (longest is None or n > longest)), default=None)
    at_fit = prober.measured.get(longest, {})
    row.update(longest=longest, first_failing=failing,
               failure=prober.measured[failing]["outcome"] if failing else None,
               peak_mem_gib=at_fit.get("peak_mem_gib"), step_time_s=at_fit.get("step_time_s"),
               probes=[dict(m, n=n) for n, m in prober.measured.items()], complete=done)
    if done and probes and probes[-1][1] == ERROR:
        row.update(complete=False, error=f"probe at {probes[-1][0]} tokens failed, not for memory (output above)")
    key = (row["config"], row["gpus"], row["overrides"])
    rows[:] = [r for r in rows if (r["config"], r["gpus"], r.get("overrides")) != key] + [row]
    write_json(out, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
