"""Tokenise a corpus once into an indexed memory-mapped dataset (a thin CLI over bbm.data.prepare).

    python data/prepare.py                                        # the Python standard library, byte-level
    python data/prepare.py --config configs/tiny.yaml             # the config's `data:` section
    python data/prepare.py --source jsonl --path 'corpus/*.jsonl' --text-field content \\
                           --tokenizer path/to/tokenizer.json --num-workers 8

Flags override the config's keys. Prints the dataset directory, then its meta.json.
"""
import argparse
import dataclasses
import json

import yaml

from bbm.data import DataConfig, TokenDataset, prepare


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training YAML; its `data:` section is the starting point")
    for field in dataclasses.fields(DataConfig):
        kind = int if field.name in ("num_workers", "shuffle_buffer", "prefetch", "max_documents") else str
        ap.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                        help=f"data.{field.name} (default {field.default!r})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as f:
            values = (yaml.safe_load(f) or {}).get("data") or {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
                   if getattr(args, f.name) is not None})
    path = prepare(DataConfig.from_dict(values), progress=not args.quiet)
    print(path)
    print(json.dumps(TokenDataset(path).meta, indent=1))


if __name__ == "__main__":
    main()
