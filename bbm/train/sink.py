"""Where metrics go (rank 0): a plain log line on stdout and in ``train.log``, ``metrics.jsonl`` in the run
directory, and Weights & Biases.

A W&B failure (no network at init, a connection reset at a log or at the finish) never stops the run or the
local metrics: it is reported in one line and W&B is dropped for the rest of the run."""
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Optional

from bbm._files import write_atomic

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CONFIG_FILE = "config.yaml"  # the resolved config of the run
WANDB_ID_FILE = "wandb_id"


def duration(seconds: float) -> str:
    """``2h05m``, ``3m07s``, ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def log_line(record: dict, max_steps: int, eta_s: Optional[float]) -> str:
    """The training line of a metrics record: step/max, loss, lr, grad norm, tokens/s, step time, MFU ('-' where no
    peak is known), peak memory and the time left."""
    def number(key, fmt):
        value = record.get(key)
        return "-" if value is None or not math.isfinite(value) else format(value, fmt)

    mfu = record.get("mfu")
    width = len(str(max_steps))
    return (f"step {record['step']:>{width}}/{max_steps} | loss {number('loss', '.4f')} | lr {number('lr', '.2e')} | "
            f"grad norm {number('grad_norm', '.3f')} | {number('tokens_per_s', ',.0f')} tok/s | "
            f"{record['step_time_s'] * 1e3:,.0f} ms/step | MFU {'-' if mfu is None else f'{mfu:.1%}'} | "
            f"peak mem {number('peak_mem_gib', '.2f')} GiB | ETA {'-' if eta_s is None else duration(eta_s)}")


def eval_line(record: dict, max_steps: int) -> str:
    """The evaluation line: held-out loss and perplexity."""
    width = len(str(max_steps))
    return (f"eval {record['step']:>{width}}/{max_steps} | eval loss {record['eval_loss']:.4f} | "
            f"eval ppl {record['eval_ppl']:.2f} | {record['eval_tokens']:,} held-out tokens | "
            f"{record['eval_time_s']:.1f} s")


class RunLog:
    """Rank 0's lines: on stdout (above the progress bar while one is drawn) and appended to <run dir>/train.log.
    Other ranks print nothing."""

    def __init__(self, run_dir, enabled: bool):
        self.path = Path(run_dir) / LOG_FILE
        self.enabled = enabled
        self.bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def clear(self):
        """Empties train.log: a run that starts from step 0 begins a new log (as it begins a new metrics.jsonl)."""
        if self.enabled:
            self.path.write_text("")

    def line(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def wandb_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online with an API key (env or ``wandb login``), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsSink:
    """Rank 0 only. ``start_step``: records after it (from a run that was resumed earlier) are dropped;
    ``elapsed_s`` is the training wall time of the records kept (a resumed run's clock continues from it)."""

    def __init__(self, run_dir, wandb_cfg, config: dict, start_step: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= start_step]
        self.elapsed_s = (kept[-1].get("elapsed_s") or 0.0) if kept else 0.0
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.wandb = None
        self.wandb_dir: Optional[Path] = None
        self.mode = wandb_mode(wandb_cfg.mode)
        if self.mode != "disabled":
            self._guarded("init", self._init_wandb, wandb_cfg, config, resumed=start_step > 0)

    def _guarded(self, what: str, fn, *args, **kwargs):
        """Runs a W&B call; on failure prints one line and drops W&B (the local metrics go on)."""
        try:
            fn(*args, **kwargs)
        except Exception as e:  # any failure of the W&B client or its service
            print(f"bbm train: W&B {what} failed ({type(e).__name__}: {e}); W&B dropped, local metrics continue in "
                  f"{self.path}", flush=True)
            self.wandb = None

    def _init_wandb(self, cfg, config: dict, resumed: bool):
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if not (resumed and id_file.is_file()):
            id_file.write_text(secrets.token_hex(4))
        self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_dir.name,
                                tags=cfg.tags, config=config, dir=str(self.run_dir), mode=self.mode,
                                id=id_file.read_text().strip(), resume="allow", settings=wandb.Settings(silent=True))
        self.wandb_dir = Path(self.wandb.dir).parent  # .../wandb/<offline-|>run-<time>-<id>

    def log(self, record: dict):
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self._guarded("log", self.wandb.log, {k: v for k, v in record.items() if k != "step" and v is not None},
                          step=record["step"])

    def close(self):
        self.file.close()
        if self.wandb is not None:
            self._guarded("finish", self.wandb.finish)
            self.wandb = None
