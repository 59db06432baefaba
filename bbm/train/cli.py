"""The ``train.py`` / ``bbm-train`` command line. The config is read and checked before torch and DeepSpeed are
imported, so a mistake in it is reported at once, in one line."""
import sys

from bbm.train.config import keys_help, load_config, presets, to_yaml

USAGE = """\
usage: python train.py --config CONFIG [section.key=value ...]      (or: bbm-train --config CONFIG ...)
       python train.py --config CONFIG --print-config [section.key=value ...]
       python train.py --help                                       (every section and key, with its default)
       deepspeed --num_gpus 8 train.py --config configs/gpt_350m_32k.yaml [section.key=value ...]

CONFIG is a YAML file or the name of a preset. Overrides are section.key=value (values are YAML:
optimizer.lr=1e-3, wandb.tags=[a, b], model.n_kv_heads=null); --section.key value and --section.key=value
work too. A run writes <run.dir>/config.yaml (the resolved config: --config it to run again), train.log,
metrics.jsonl, dashboard.png and checkpoints/."""
EXAMPLE = "quick start (2 CPU cores, about 3 minutes): python train.py --config tiny_cpu"
FLAGS = ("--config", "--local_rank", "--local-rank")


def preset_lines() -> str:
    """One line per preset: its name and the first line of its leading comment."""
    lines = []
    for name, path in presets().items():
        head = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        lines.append(f"  {name:<14} {head}")
    return "presets:\n" + "\n".join(lines) if lines else "presets: none found"


def parse_args(argv):
    """(options, overrides) from the command line: ``--config``, ``--local_rank`` (set by launchers),
    ``--print-config``, ``--help``; the rest are overrides, each ``key=value``, ``--key=value`` or ``--key value``."""
    options, overrides, i = {"config": None, "local_rank": None, "print_config": False, "help": False}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            options["help"] = True
            continue
        if arg == "--print-config":
            options["print_config"] = True
            continue
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            if not eq:  # --key value
                if i == len(argv) or argv[i].startswith("--"):
                    raise ValueError(f"{name}: expected a value after it ({name[2:]}=VALUE or {name} VALUE), "
                                     "got none")
                value, i = argv[i], i + 1
            if name in FLAGS:
                options["config" if name == "--config" else "local_rank"] = value
                continue
            name = name[2:]
        elif not eq:
            raise ValueError(f"{arg}: expected an override section.key=value (e.g. run.max_steps=10) or an option "
                             f"(--config, --print-config, --help), got {arg!r}")
        overrides.append(f"{name}={value}")
    if options["local_rank"] is not None:
        options["local_rank"] = int(options["local_rank"])
    return options, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"{USAGE}\n\n{preset_lines()}\n\n{EXAMPLE}", file=sys.stderr)
        sys.exit(2)
    try:
        options, overrides = parse_args(argv)
        if options["help"]:
            print(f"{USAGE}\n\n{preset_lines()}\n\nkeys (section.key=default  meaning; bounds):\n{keys_help()}")
            return
        if options["config"] is None:
            raise ValueError("--config: expected a YAML file or a preset name (python train.py lists them), got none")
        cfg = load_config(options["config"], overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    if options["print_config"]:
        print(to_yaml(cfg), end="")
        return
    sys.exit(train(cfg, options["local_rank"]))


def train(cfg, local_rank) -> int:
    """Runs the trainer; -> the exit status: 0 when finished, 128 + the signal number when stopped by one
    (``bbm.train.stop``), 1 on an error, reported in one line with its traceback in ``<run dir>/error_rank<R>.log``."""
    import pickle
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    from bbm.train.trainer import Trainer  # torch and DeepSpeed: only once the config is known to be good

    try:
        status = Trainer(cfg, local_rank=local_rank).train()["exit_code"]
    except (ValueError, TypeError, RuntimeError, MemoryError, OSError, pickle.UnpicklingError) as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        log = Path(cfg.run.dir) / f"error_rank{rank}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        print(f"bbm train: error on rank {rank}: {e}  (traceback: {log})", file=sys.stderr, flush=True)
        status = 1
    if dist.is_initialized():
        dist.destroy_process_group()  # join gloo/NCCL threads before the interpreter exits
    return status
