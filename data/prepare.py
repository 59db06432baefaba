"""Tokenise a corpus once into an indexed memory-mapped dataset (a thin CLI over bbm.data.prepare).

    python data/prepare.py                                        # the Python standard library, byte-level
    python data/prepare.py --config configs/tiny_cpu.yaml         # a training config's `data:` section
    python data/prepare.py --config tiny_cpu                      # the same, by preset name
    python data/prepare.py --source jsonl --path 'corpus/*.jsonl' --text-field content \\
                           --tokenizer path/to/tokenizer.json --num-workers 8

Flags override the config's keys. Prints the dataset directory, then its meta.json.
"""
import argparse
import dataclasses
import json
import sys

from bbm._config import value_type
from bbm.data import DataConfig, TokenDataset, prepare
from bbm.train.config import find_config, read_yaml


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training YAML or preset name; its `data:` section is the starting point")
    for field in dataclasses.fields(DataConfig):
        kind = value_type(DataConfig, field.name)
        ap.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                        help=f"data.{field.name} (default {field.default!r})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        values = (read_yaml(find_config(args.config)).get("data") or {}) if args.config else {}
        values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
                       if getattr(args, f.name) is not None})
        cfg = DataConfig.from_dict(values)
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    path = prepare(cfg, progress=not args.quiet)
    print(path)
    print(json.dumps(TokenDataset(path).meta, indent=1))


if __name__ == "__main__":
    main()
