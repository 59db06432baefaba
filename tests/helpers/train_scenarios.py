"""Training scenarios run in a child process (DeepSpeed keeps one process group per process, so the tests
never initialise one inside pytest). ``python scenarios.py MODE WORKDIR [overrides...]``:

  single    ZeRO 0-3 runs, metrics + W&B offline, SIGINT stop-and-resume, non-finite stop/skip;
            writes WORKDIR/results.json
  killsave  trains with checkpoint.every=2 and SIGKILLs itself in the middle of the step-4 save
"""
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from bbm.train import Trainer, load_config

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "tiny_cpu.yaml"
TORCH_LINEAR = torch.nn.functional.linear


def tiny(workdir: Path, name: str, extra=()):
    """The tiny CPU preset shrunk to a few seconds: N=128, 2 layers, dim 64, 40 stdlib files."""
    overrides = ["run.seq_len=128", "run.micro_batch_size=2", "run.max_steps=6", "model.dim=64", "model.n_layers=2",
                 "model.n_heads=4", "model.n_kv_heads=2", "data.max_documents=40", f"data.cache_dir={workdir / 'data'}",
                 "optimizer.lr=1e-2", "schedule.warmup_steps=0", "metrics.log_every=1", "metrics.gain_every=0",
                 "metrics.progress_bar=false", "wandb.mode=disabled", "checkpoint.every=0", "checkpoint.resume=none",
                 f"run.dir={workdir / name}", *extra]
    return load_config(PRESET, overrides)


def losses(run_dir) -> list:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def call_hook(trainer: Trainer, on_call: int, action):
    """Runs ``action()`` in the ``on_call``-th forward pass of the model (counted over micro-batches)."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        return action(output) if calls[0] == on_call else None

    return trainer.engine.module.norm.register_forward_hook(hook)


def zero_stages(workdir: Path) -> dict:
    out = {}
    variants = {0: [], 1: ["metrics.profile_steps=[2,3]"], 2: ["deepspeed.bf16=true", "wandb.mode=offline", "metrics.gain_every=2"],
                3: ["deepspeed.activation_checkpointing=true", "deepspeed.gradient_accumulation_steps=2",
                    "checkpoint.every=3"]}
    for stage, extra in variants.items():
        cfg = tiny(workdir, f"zero{stage}", [f"deepspeed.zero_stage={stage}", *extra])
        summary = Trainer(cfg).train()
        # ZeRO-3 leaves torch's F.linear in place (the compiled regions of the blocks call it on GPU)
        out[f"zero{stage}"] = {"losses": losses(cfg.run.dir), "summary": summary,
                               "torch_linear": torch.nn.functional.linear is TORCH_LINEAR}
    return out


def stop_and_resume(workdir: Path) -> dict:
    """Uninterrupted vs SIGINT after step 3 + resume=auto (ZeRO-1)."""
    extra = ["deepspeed.zero_stage=1", "schedule.warmup_steps=2"]
    whole = tiny(workdir, "whole", extra)
    Trainer(whole).train()
    parts = tiny(workdir, "parts", extra)
    first = Trainer(parts)
    call_hook(first, 3, lambda out: os.kill(os.getpid(), signal.SIGINT))
    stopped = first.train()
    second = Trainer(tiny(workdir, "parts", [*extra, "checkpoint.resume=auto"]))
    resumed_at = second.step
    second.train()
    records = [json.loads(line) for line in (Path(parts.run.dir) / "metrics.jsonl").read_text().splitlines()]
    return {"whole": losses(whole.run.dir), "parts": losses(parts.run.dir), "stopped": stopped, "resumed_at": resumed_at,
            "markers": [(r["step"], r["resumed_at"]) for r in records if "resumed_at" in r],
            "elapsed": [r["elapsed_s"] for r in records],
            "log": (Path(parts.run.dir) / "train.log").read_text()}


def poison_gradient(output):
    """The output unchanged, its gradient made infinite: a finite loss with non-finite gradients."""
    output.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    return output


def nonfinite(workdir: Path) -> dict:
    """A NaN loss, and (bf16, ZeRO-2) an infinite gradient, in the third micro-batch; stop and skip each."""
    cases = {"loss": ([], lambda output: output * float("nan")),
             "grad": (["deepspeed.bf16=true", "deepspeed.zero_stage=2"], poison_gradient)}
    out = {}
    for what, (extra, action) in cases.items():
        for mode in ("stop", "skip"):
            trainer = Trainer(tiny(workdir, f"nan_{what}_{mode}", [f"run.on_nonfinite={mode}", *extra]))
            call_hook(trainer, 3, action)
            try:
                trainer.train()
                out[f"{what}_{mode}"] = {"error": None, "records": [
                    json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]}
            except FloatingPointError as e:
                out[f"{what}_{mode}"] = {"error": str(e)}
    return out


def kill_during_save(workdir: Path, overrides):
    """Dies (SIGKILL) after DeepSpeed wrote part of the step-4 checkpoint."""
    saves = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            saves.append(str(f))
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    Trainer(load_config(PRESET, overrides)).train()


def main():
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    if mode == "killsave":
        kill_during_save(workdir, sys.argv[3:])
        return
    results = {}
    for name, fn in (("stages", zero_stages), ("resume", stop_and_resume), ("nonfinite", nonfinite)):
        try:
            results[name] = fn(workdir)
        except Exception:  # reported per scenario, so one failure does not hide the others
            results[name] = {"crash": traceback.format_exc()}
    (workdir / "results.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
