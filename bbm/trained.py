"""A trained model read back for use: its decoder, tokenizer and context length, from a run directory (the
newest complete checkpoint, any ZeRO stage) or from a directory ``python -m bbm.export`` wrote.

Checkpoint files are read with ``torch.load(weights_only=True)`` (``bbm.train.safe_load``): tensors and plain
containers only, plus the few plain DeepSpeed records its files hold; nothing read can run code. A run's newest
checkpoint is the newest whose files match its manifest."""
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bbm._checks import fail
from bbm.data.tokenizer import ByteTokenizer, load_tokenizer
from bbm.llama_format import from_llama, model_config
from bbm.model import Decoder

EXPORT_META = "bbm.json"  # what an export adds to config.json: the tokenizer, attention backend, context, source


@dataclass
class Trained:
    model: Decoder
    tokenizer: object  # bbm.data.tokenizer.ByteTokenizer or HFTokenizer
    seq_len: int  # the context it was trained on
    source: str  # the checkpoint or export directory


def _load(path: Path) -> dict:
    """A checkpoint file, weights only (``bbm.train.safe_load``)."""
    if not torch.cuda.is_available():  # DeepSpeed's classes only: no accelerator detection (and its warning)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from bbm.train.safe_load import deepspeed_types, load

    return load(path, allowed=deepspeed_types())


def _rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def model_states(ckpt: Path) -> Path:
    """The file of a DeepSpeed checkpoint that holds the module and the client state: the whole module (ZeRO
    0-2), or rank 0's (ZeRO-3: its tensors are placeholders, the parameters live in the optimizer files)."""
    whole = ckpt / "mp_rank_00_model_states.pt"
    return whole if whole.is_file() else ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"


def checkpoint_weights(ckpt: Path) -> dict:
    """The model's state dict in a DeepSpeed checkpoint directory: the module's tensors (ZeRO 0-2), or the fp32
    partitions of every rank put back together (ZeRO-3)."""
    ckpt = Path(ckpt)
    if model_states(ckpt).name.startswith("mp_rank"):
        return _load(model_states(ckpt))["module"]
    model_files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank)
    optim_files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank)
    if not model_files or len(optim_files) != len(model_files):
        fail("checkpoint", "a DeepSpeed checkpoint directory (mp_rank_00_model_states.pt, or ZeRO-3's zero_pp_rank "
             "files of every rank)", str(ckpt), FileNotFoundError)
    meta = _load(model_files[0])
    # each rank holds ceil(numel / world) elements of every parameter, in parameter order, in its flat fp32 groups
    flats = [torch.cat(_load(f)["optimizer_state_dict"]["fp32_flat_groups"]) for f in optim_files]
    world, offset, state = len(flats), 0, {}
    for name, shape in ((n, s) for group in meta["param_shapes"] for n, s in group.items()):
        part = math.ceil(shape.numel() / world)
        state[name] = torch.cat([flat[offset:offset + part] for flat in flats])[:shape.numel()].view(shape)
        offset += part
    for name, source in meta.get("shared_params", {}).items():  # tied weights are stored once
        state[name] = state[source]
    for name in meta.get("buffer_names") or []:
        state[name] = meta["module"][name]
    return state


def _from_run(run_dir: Path):
    from bbm.train.checkpoint import first_verified, newest_first, read_state
    from bbm.train.config import from_dict, read_yaml
    from bbm.train.sink import CONFIG_FILE

    ckpt = first_verified(newest_first(run_dir / "checkpoints"), print)
    if ckpt is None:
        fail("run_dir", "a run directory with a checkpoint whose files match its manifest (checkpoints/step_*)",
             str(run_dir), FileNotFoundError)
    config = run_dir / CONFIG_FILE
    # the resolved config the run wrote, else the one its checkpoint keeps
    cfg = from_dict(read_yaml(config) if config.is_file() else read_state(ckpt)["config"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg = replace(cfg.model, vocab_size=cfg.model.vocab_size or tokenizer.vocab_size, fused=False)
    return model_cfg, checkpoint_weights(ckpt), tokenizer, cfg.run.seq_len, str(ckpt)


def _from_export(out_dir: Path):
    from safetensors.torch import load_file

    meta = json.loads((out_dir / EXPORT_META).read_text())
    model_cfg = model_config(json.loads((out_dir / "config.json").read_text()), attention=meta["attention"],
                             bbm_backend=meta["bbm_backend"], fused=False)
    tok = meta["tokenizer"]
    tokenizer = ByteTokenizer() if tok["kind"] == "byte" else load_tokenizer(str(out_dir / tok["file"]))
    return model_cfg, from_llama(load_file(out_dir / "model.safetensors"), model_cfg), tokenizer, meta["seq_len"], \
        str(out_dir)


def load_trained(path, device="cpu", dtype=torch.float32) -> Trained:
    """The model of a run directory's newest checkpoint, or of an export directory, in eval mode."""
    path = Path(path)
    if (path / EXPORT_META).is_file():
        model_cfg, state, tokenizer, seq_len, source = _from_export(path)
    elif path.is_dir():
        model_cfg, state, tokenizer, seq_len, source = _from_run(path)
    else:
        fail("path", "a run directory or an export directory", str(path), FileNotFoundError)
    model = Decoder(model_cfg)
    model.load_state_dict(state)
    return Trained(model.to(device=device, dtype=dtype).eval(), tokenizer, seq_len, source)

