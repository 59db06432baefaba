"""Training configuration: YAML -> typed dataclasses, with ``key.sub=value`` command-line overrides.

Unknown keys and values of the wrong type are errors that name the dotted key."""
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from bbm._checks import fail
from bbm.data import DataConfig
from bbm.distributed.ulysses import kv_replication
from bbm.model import ModelConfig

FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # PyYAML reads "3e-4" as a string


@dataclass
class RunConfig:
    dir: Optional[str] = None  # None: runs/<config file stem>
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    seq_len: int = 2048
    micro_batch_size: int = 1  # sequences per rank per micro-step
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    on_nonfinite: str = "stop"  # stop | skip (drop the micro-batch and take the next one)
    max_skips: int = 10  # consecutive non-finite micro-batches tolerated when skipping


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0-3
    bf16: bool = False
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # 0: off
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass
    sequence_parallel_size: int = 1  # Ulysses: ranks that split each sequence (world = data parallel x this)
    extra: dict = field(default_factory=dict)  # merged last into the DeepSpeed config dict


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between saves; 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint of the run, if any) | none | <checkpoint dir>
    at_end: bool = True  # save when the run ends (benchmarks turn it off)


@dataclass
class MetricsConfig:
    log_every: int = 10
    gain_every: int = 100  # steps between timings of the chosen attention vs dense causal SDPA; 0: never
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs, else MFU is not reported
    progress_bar: bool = True
    profile_steps: Optional[Tuple[int, int]] = None  # [first, last] optimizer steps traced into <run dir>/profile


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (WANDB_MODE, else online with an API key, else offline) | online | offline | disabled
    project: str = "bbm"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run directory's name
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self):
        r = self
        positive = {"run.max_steps": r.run.max_steps, "run.seq_len": r.run.seq_len,
                    "run.micro_batch_size": r.run.micro_batch_size, "run.max_skips": r.run.max_skips,
                    "deepspeed.gradient_accumulation_steps": r.deepspeed.gradient_accumulation_steps,
                    "deepspeed.sequence_parallel_size": r.deepspeed.sequence_parallel_size,
                    "checkpoint.keep_last": r.checkpoint.keep_last, "metrics.log_every": r.metrics.log_every,
                    "optimizer.lr": r.optimizer.lr, "optimizer.eps": r.optimizer.eps}
        for key, value in positive.items():
            if value <= 0:
                fail(key, "a positive number", value)
        non_negative = {"optimizer.weight_decay": r.optimizer.weight_decay, "schedule.warmup_steps": r.schedule.warmup_steps,
                        "deepspeed.gradient_clipping": r.deepspeed.gradient_clipping, "checkpoint.every": r.checkpoint.every,
                        "metrics.gain_every": r.metrics.gain_every, "run.seed": r.run.seed}
        for key, value in non_negative.items():
            if value < 0:
                fail(key, "a number >= 0", value)
        _choice("run.device", r.run.device, ("auto", "cuda", "cpu"))
        _choice("run.on_nonfinite", r.run.on_nonfinite, ("stop", "skip"))
        _choice("schedule.kind", r.schedule.kind, ("cosine", "linear", "constant"))
        _choice("wandb.mode", r.wandb.mode, ("auto", "online", "offline", "disabled"))
        _choice("deepspeed.zero_stage", r.deepspeed.zero_stage, (0, 1, 2, 3))
        if not 0 <= r.schedule.min_lr_ratio <= 1:
            fail("schedule.min_lr_ratio", "a float in [0, 1]", r.schedule.min_lr_ratio)
        if not all(0 <= b < 1 for b in r.optimizer.betas):
            fail("optimizer.betas", "two floats in [0, 1)", list(r.optimizer.betas))
        sp = r.deepspeed.sequence_parallel_size
        if sp < 1:
            fail("deepspeed.sequence_parallel_size", "an int >= 1", sp)
        if sp > 1:  # Ulysses splits the heads and the sequence over sp ranks (the world size is checked at start)
            try:
                kv_replication(r.model.n_heads, r.model.kv_heads, sp)
            except ValueError as e:
                raise ValueError(f"model.{e}") from None
            if r.run.seq_len % sp:
                fail("run.seq_len", f"a multiple of deepspeed.sequence_parallel_size={sp}", r.run.seq_len)
        profiled = r.metrics.profile_steps
        if profiled is not None and not 1 <= profiled[0] <= profiled[1]:
            fail("metrics.profile_steps", "[first, last] steps with 1 <= first <= last", list(profiled))
        if r.metrics.peak_tflops is not None and r.metrics.peak_tflops <= 0:
            fail("metrics.peak_tflops", "a positive float or null", r.metrics.peak_tflops)
        if r.checkpoint.resume not in ("auto", "none") and not Path(r.checkpoint.resume).is_dir():
            fail("checkpoint.resume", "'auto', 'none' or an existing checkpoint directory", repr(r.checkpoint.resume))
        r.model.validate("model")
        return self


def _choice(key, value, allowed):
    if value not in allowed:
        fail(key, f"one of {allowed}", repr(value))


def _coerce(key: str, tp, value):
    """``value`` checked against the annotation ``tp`` (dataclasses recursively)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            want = f"a list of {len(args)} values" if origin is tuple else "a list"
            fail(key, want, repr(value), TypeError)
        items = [_coerce(f"{key}[{i}]", args[i] if origin is tuple else args[0], v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict:
        if not isinstance(value, dict):
            fail(key, "a mapping", repr(value), TypeError)
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_LITERAL.match(value):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail(key, "a float", repr(value), TypeError)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        fail(key, "an int", repr(value), TypeError)
    if tp in (bool, str) and not isinstance(value, tp):
        fail(key, f"a {tp.__name__}", repr(value), TypeError)
    return value


def _build(cls, values, prefix: str = ""):
    """An instance of dataclass ``cls`` from a mapping; unknown keys and wrong types name the dotted key."""
    where = prefix or "config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        fail(where, "a mapping", repr(values), TypeError)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            fail(f"{prefix}.{key}" if prefix else str(key), f"a known key of '{where}' ({', '.join(names)})",
                 "an unknown key")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def parse_override(text: str):
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        fail("override", "key=value (e.g. optimizer.lr=1e-3)", repr(text))
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        fail("override", "a dotted key before '=' (e.g. optimizer.lr=1e-3)", repr(text))
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_override(tree: dict, path, value):
    node = tree
    for part in path[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            fail(".".join(path), f"a key under a mapping, but {part!r} is a value", repr(node[part]))
        node = node[part]
    node[path[-1]] = value


def load_config(path=None, overrides=()) -> TrainConfig:
    """Reads a YAML file (optional), applies ``key=value`` overrides, builds and validates the config."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            fail("--config", "an existing YAML file", str(path), FileNotFoundError)
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            fail(str(path), "a YAML mapping at the top level", type(tree).__name__, TypeError)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    cfg = _build(TrainConfig, tree)
    if cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / (path.stem if path is not None else "default"))
    return cfg.validate()


def to_dict(cfg) -> dict:
    """Plain nested dict (YAML-safe) of a config."""
    out = dataclasses.asdict(cfg)
    return yaml.safe_load(yaml.safe_dump(_plain(out)))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
