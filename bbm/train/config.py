"""Training configuration: YAML -> typed dataclasses, with ``section.key=value`` command-line overrides.

Every key is a ``setting`` (``bbm._config``): its default, its meaning (``train.py --help``) and its bounds live in
one place. Unknown keys, values of the wrong type or out of bounds, and YAML syntax errors are one-line errors that
name the dotted key (or the file and line); an unknown key gets the nearest known ones as suggestions. No torch
here: train.py checks a config before it imports torch or DeepSpeed."""
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from bbm._checks import fail
from bbm._config import check_fields, describe, setting
from bbm.data.config import DataConfig
from bbm.model.config import ModelConfig

FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # PyYAML reads "3e-4" as a string
PACKAGE = Path(__file__).resolve().parents[1]
# presets: configs/ of a source checkout, or bbm/configs of an installed package (setup.py maps one onto the other)
PRESET_DIRS = (PACKAGE.parent / "configs", PACKAGE / "configs")


@dataclass
class RunConfig:
    """run: length, shapes, device and directory of the run"""
    dir: Optional[str] = setting(None, "run directory (metrics, checkpoints, config.yaml, train.log); "
                                       "null: runs/<config file stem>")
    seed: int = setting(0, "seed of the weights' init and of the data order", within="[0, inf)")
    max_steps: int = setting(100, "optimizer steps", within="[1, inf)")
    seq_len: int = setting(2048, "tokens per packed sequence", within="[1, inf)")
    micro_batch_size: int = setting(1, "sequences per rank per micro-step", within="[1, inf)")
    device: str = setting("auto", "auto: cuda if available", choices=("auto", "cuda", "cpu"))
    on_nonfinite: str = setting("stop", "a non-finite loss or gradient: stop, or skip (drop the micro-batch and "
                                        "take the next one)", choices=("stop", "skip"))
    max_skips: int = setting(10, "consecutive non-finite micro-batches tolerated when skipping", within="[1, inf)")


@dataclass
class OptimizerConfig:
    """optimizer: AdamW"""
    lr: float = setting(3e-4, "peak learning rate", within="(0, inf)")
    betas: Tuple[float, float] = setting((0.9, 0.95), "Adam betas", within="[0, 1)")
    eps: float = setting(1e-8, "Adam epsilon", within="(0, inf)")
    weight_decay: float = setting(0.1, "decoupled weight decay (matrices only)", within="[0, inf)")


@dataclass
class ScheduleConfig:
    """schedule: learning rate over the steps"""
    kind: str = setting("cosine", "decay after the warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = setting(0, "linear warmup from 0", within="[0, inf)")
    min_lr_ratio: float = setting(0.1, "final lr = lr * min_lr_ratio (cosine, linear)", within="[0, 1]")


@dataclass
class DeepSpeedConfig:
    """deepspeed: the engine's settings (the DeepSpeed config dict is built from them)"""
    zero_stage: int = setting(0, "ZeRO stage", choices=(0, 1, 2, 3))
    bf16: bool = setting(False, "bf16 weights and activations (fp32 master weights)")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", within="[1, inf)")
    gradient_clipping: float = setting(1.0, "max gradient 2-norm; 0: off", within="[0, inf)")
    activation_checkpointing: bool = setting(False, "recompute each decoder block in the backward pass")
    sequence_parallel_size: int = setting(1, "Ulysses: ranks that split each sequence (world = data parallel x "
                                             "this)", within="[1, inf)")
    extra: dict = setting({}, "merged last into the DeepSpeed config dict")


@dataclass
class CheckpointConfig:
    """checkpoint: saving and resuming"""
    every: int = setting(0, "optimizer steps between saves; 0: only at the end and on SIGTERM/SIGINT",
                         within="[0, inf)")
    keep_last: int = setting(2, "complete checkpoints kept", within="[1, inf)")
    resume: str = setting("auto", "auto (newest complete checkpoint of the run, if any) | none | <checkpoint dir>")
    at_end: bool = setting(True, "save when the run ends")


@dataclass
class MetricsConfig:
    """metrics: the log line, metrics.jsonl, W&B and the dashboard"""
    log_every: int = setting(10, "optimizer steps between log lines / metrics records", within="[1, inf)")
    gain_every: int = setting(100, "steps between timings of the chosen attention vs dense causal SDPA; 0: never",
                              within="[0, inf)")
    peak_tflops: Optional[float] = setting(None, "per device, for MFU; null: known GPUs, else MFU is not reported",
                                           within="(0, inf)")
    progress_bar: bool = setting(True, "a tqdm bar when stdout is a terminal")
    profile_steps: Optional[Tuple[int, int]] = setting(None, "[first, last] optimizer steps traced into "
                                                             "<run dir>/profile", within="[1, inf)")


@dataclass
class EvalConfig:
    """eval: loss on documents held out of training (data.eval_fraction), packed and masked as in training"""
    every: int = setting(200, "optimizer steps between evaluations, and one at the end; 0: none", within="[0, inf)")
    tokens: int = setting(65536, "held-out tokens per evaluation (whole micro-batches, the same ones each time)",
                          within="[1, inf)")


@dataclass
class WandbConfig:
    """wandb: Weights & Biases"""
    mode: str = setting("auto", "auto: WANDB_MODE, else online with an API key, else offline",
                        choices=("auto", "online", "offline", "disabled"))
    project: str = setting("bbm", "W&B project")
    entity: Optional[str] = setting(None, "W&B entity (team or user)")
    name: Optional[str] = setting(None, "run name; null: the run directory's name")
    tags: List[str] = setting([], "run tags")


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self):
        """Each key against its bounds (the data section checks itself when built), then the rules between keys."""
        r = self
        for f in dataclasses.fields(self):
            if f.name == "model":
                r.model.validate("model")
            elif f.name != "data":
                check_fields(getattr(self, f.name), f.name)
        sp = r.deepspeed.sequence_parallel_size
        if sp > 1:  # Ulysses splits the heads and the sequence over sp ranks (the world size is checked at start)
            from bbm.distributed.ulysses import kv_replication  # imports torch: only sequence-parallel configs

            try:
                kv_replication(r.model.n_heads, r.model.kv_heads, sp)
            except ValueError as e:
                raise ValueError(f"model.{e}") from None
            if r.run.seq_len % sp:
                fail("run.seq_len", f"a multiple of deepspeed.sequence_parallel_size={sp}", r.run.seq_len)
        profiled = r.metrics.profile_steps
        if profiled is not None and profiled[0] > profiled[1]:
            fail("metrics.profile_steps", "[first, last] steps with 1 <= first <= last", list(profiled))
        if r.eval.every and not r.data.eval_fraction:
            fail("eval.every", "0 when data.eval_fraction is 0 (no documents are held out to evaluate on)",
                 r.eval.every)
        if r.checkpoint.resume not in ("auto", "none") and not Path(r.checkpoint.resume).is_dir():
            fail("checkpoint.resume", "'auto', 'none' or an existing checkpoint directory", repr(r.checkpoint.resume))
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


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
            dotted = f"{prefix}.{key}" if prefix else str(key)
            known = f"a known key of {prefix!r}" if prefix else "a section name"
            fail(dotted, f"{known} ({suggest(str(key), names, prefix, values[key])})", "an unknown key")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def suggest(key: str, names: list, prefix: str, value) -> str:
    """'did you mean ...' for an unknown ``key`` among ``names``; at the top level, also the sections that have a
    key of that name (``max_steps`` -> run.max_steps)."""
    if not prefix:
        owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if owners:
            forms = " or ".join(f"{s}.{key}" for s in owners)
            example = f"{owners[0]}.{key}={flow(value)}"
            return f"did you mean {forms}? keys sit under their section: {example} on the command line"
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    dotted = [f"{prefix}.{c}" if prefix else c for c in close]
    return f"did you mean {' or '.join(dotted)}?" if close else f"one of {', '.join(names)}"


def parse_override(text: str):
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        fail("override", "key=value (e.g. optimizer.lr=1e-3)", repr(text))
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        fail("override", "a dotted key before '=' (e.g. optimizer.lr=1e-3)", repr(text))
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        fail(key, "a YAML value", f"{raw!r} ({getattr(e, 'problem', None) or e})")


def apply_override(tree: dict, path, value):
    node = tree
    for part in path[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            fail(".".join(path), f"a key under a mapping, but {part!r} is a value", repr(node[part]))
        node = node[part]
    node[path[-1]] = value


def presets() -> dict:
    """Preset name -> its YAML file, from the first preset directory that exists."""
    folder = next((d for d in PRESET_DIRS if d.is_dir()), None)
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def find_config(spec) -> Path:
    """A YAML path, or the name of a preset (``tiny_cpu``)."""
    path = Path(spec)
    if path.is_file():
        return path
    known = presets()
    if str(spec) in known:
        return known[str(spec)]
    fail("--config", f"an existing YAML file or a preset name ({', '.join(known) or 'none found'})", str(spec),
         FileNotFoundError)


def read_yaml(path: Path) -> dict:
    """A config file's mapping; a syntax error is one line naming the file, line and column."""
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}: expected valid YAML, got {problem}") from None
    if tree is not None and not isinstance(tree, dict):
        fail(str(path), "a YAML mapping at the top level", type(tree).__name__, TypeError)
    return tree or {}


def load_config(path=None, overrides=()) -> TrainConfig:
    """Reads a YAML file or preset (optional), applies ``key=value`` overrides, builds and validates the config."""
    tree = {}
    if path is not None:
        path = find_config(path)
        tree = read_yaml(path)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    cfg = from_dict(tree)
    if cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / (path.stem if path is not None else "default"))
    return cfg.validate()


def from_dict(tree: dict) -> TrainConfig:
    """A config from a nested mapping (each key checked for its type), before ``validate``."""
    return _build(TrainConfig, tree)


def to_dict(cfg) -> dict:
    """Plain nested dict (YAML-safe) of a config."""
    out = dataclasses.asdict(cfg)
    return yaml.safe_load(yaml.safe_dump(_plain(out), sort_keys=False))


def to_yaml(cfg) -> str:
    """The config as YAML, sections and keys in their declared order; ``load_config`` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flow(value) -> str:
    """A value as one line of YAML, as an override writes it (``[0.9, 0.95]``, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def keys_help() -> str:
    """Every section and key with its default and meaning, for ``train.py --help``."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:  {(cls.__doc__ or '').split(':', 1)[-1].strip()}")
        defaults = to_dict(cls())
        for f in dataclasses.fields(cls):
            lines.append(f"  {name}.{f.name}={flow(defaults[f.name])}".ljust(40) + f"  {describe(f)}")
    return "\n".join(lines)
