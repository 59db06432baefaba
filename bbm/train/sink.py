"""Where metrics go: ``metrics.jsonl`` in the run directory (always) and Weights & Biases (rank 0).

A W&B failure (no network at init, a connection reset at a log or at the finish) never stops the run or the
local metrics: it is reported in one line and W&B is dropped for the rest of the run."""
import json
import math
import os
import secrets
from pathlib import Path
from typing import Optional

from bbm._files import write_atomic

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"


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
    """Rank 0 only. ``start_step``: records after it (from a run that was resumed earlier) are dropped."""

    def __init__(self, run_dir, wandb_cfg, config: dict, start_step: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= start_step]
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
