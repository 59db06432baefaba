"""Export a trained model as a Hugging Face LLaMA: ``python -m bbm.export RUN_DIR OUT_DIR [--dtype bfloat16]``.

Writes OUT_DIR/model.safetensors (LLaMA tensor names), config.json (``LlamaForCausalLM``), tokenizer.json (a
Hugging Face tokenizer's file; byte-level runs have none: ids 0-255 are the UTF-8 bytes, 256 ends a document) and
bbm.json (the tokenizer, attention backend and context bbm needs to read the directory back: ``python -m
bbm.generate OUT_DIR``)."""
import argparse
import json
import shutil
from pathlib import Path

import torch

from bbm._checks import fail
from bbm.llama_format import hf_config, to_llama
from bbm.trained import EXPORT_META, Trained, load_trained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(source, out_dir, dtype: str = "float32") -> Path:
    """Writes the export of a run directory (its newest checkpoint) or of another export into ``out_dir``."""
    return write_export(load_trained(source), out_dir, dtype)


def write_export(trained: Trained, out_dir, dtype: str = "float32") -> Path:
    """Writes model.safetensors, config.json, bbm.json (and tokenizer.json) of ``trained`` into ``out_dir``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        fail("dtype", f"one of {tuple(DTYPES)}", repr(dtype))
    cfg, tok = trained.model.cfg, trained.tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_llama(trained.model.state_dict(), cfg).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(cfg, max_positions=trained.seq_len, eod_id=tok.eod_id, pad_id=tok.pad_id,
                       dtype=DTYPES[dtype])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "pad_id": tok.pad_id}
    if tok.kind == "hf":
        if Path(tok.path).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tok.path, out / "tokenizer.json")
        tokenizer["file"] = "tokenizer.json"
    meta = {"tokenizer": tokenizer, "attention": cfg.attention, "bbm_backend": cfg.bbm_backend,
            "seq_len": trained.seq_len, "source": trained.source}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory (its newest checkpoint) or an export directory")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    out = export(args.source, args.out_dir, args.dtype)
    print(f"exported {args.source} -> {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
