"""Crash-safe, verified checkpoints through the DeepSpeed engine (any ZeRO stage).

Layout under ``<run dir>/checkpoints``::

    step_00000200/          a complete checkpoint:
        (DeepSpeed's files)     model, optimizer and scheduler states
        rank_00000.pt ...       each rank's random-number states (tensors and plain data)
        state.json              step, tokens seen, data position, resolved config, world size
        manifest.json           every other file's size and sha256 (``bbm.train.manifest``), written last
    latest                  the name of the newest complete one
    tmp.step_00000300/      a save in progress (or one interrupted by a crash: ignored, later removed)

A save writes everything into ``tmp.<tag>``, waits for every rank, writes the manifest, then rank 0 renames the
directory to ``<tag>`` and replaces ``latest`` atomically, so a crash at any point leaves the previous checkpoint
intact and named by ``latest``. Old checkpoints beyond ``keep_last`` are renamed away before they are deleted.

A resume takes the newest checkpoint whose files match its manifest, naming each one it skips and why, and loads
every file without running code from it (``bbm.train.safe_load``). The checkpoint directory is on a filesystem
that every rank sees (each rank hashes a share of the files).
"""
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from bbm._checks import fail
from bbm._files import fsync_path, write_atomic
from bbm.train import manifest, safe_load

TAG = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
STATE = "state.json"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def rng_state() -> dict:
    """This process's random-number states as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(root: Path):
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


def newest_first(root: Path) -> List[Path]:
    """The checkpoints under ``root`` to try in turn: the one ``latest`` names, then the others, newest first."""
    tags = complete_tags(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
    return [root / tag for tag in tags]


def candidates(resume: str, root: Path) -> List[Path]:
    """The checkpoint directories that ``checkpoint.resume`` allows, in the order to try them: ``auto`` (this run's,
    newest first; none for a new run), ``none``, or a path to one checkpoint directory or to a folder of them."""
    if resume == "none":
        return []
    if resume == "auto":
        return newest_first(root)
    path = Path(resume)
    if TAG.match(path.name) and path.is_dir():
        return [path]
    found = newest_first(path)
    if not found:
        fail("checkpoint.resume", "a checkpoint directory (step_XXXXXXXX) or a folder holding one", str(path))
    return found


def first_verified(paths: List[Path], say: Callable[[str], None]) -> Optional[Path]:
    """Collective: the first of ``paths`` whose files match its manifest; ``say`` gets one line per skipped one."""
    for path in paths:
        reason = manifest.problem(path)
        if reason is None:
            return path
        say(f"checkpoint {path} skipped: {reason}")
    return None


def read_state(path: Path) -> dict:
    """The trainer's state (``state.json``) of a verified checkpoint."""
    file = Path(path) / STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(str(file), "the checkpoint's JSON trainer state", f"{type(e).__name__}: {e}")
    keys = ("step", "tokens_seen", "loader", "config", "world_size")
    if not isinstance(state, dict) or set(keys) - set(state):
        fail(str(file), f"a JSON object with keys {list(keys)}", "other JSON")
    return state


class Checkpointer:
    def __init__(self, root, keep_last: int, rank: int):
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank

    def save(self, engine, step: int, state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. ``state`` (JSON data, rank 0's is written) is the trainer's,
        ``rank_state`` (tensors and plain data) each rank's own. Returns the checkpoint directory."""
        tag = tag_of(step)
        tmp_tag = f"tmp.{tag}"
        tmp = self.root / tmp_tag
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        torch.save(rank_state, rank_file(tmp, self.rank))
        if self.rank == 0:
            (tmp / STATE).write_text(json.dumps(state, indent=1))
        dist.barrier()  # every rank's files are written
        manifest.write(tmp, step=step, world_size=dist.get_world_size())
        if self.rank == 0:
            self._publish(tmp_tag, tag)
        dist.barrier()
        return self.root / tag

    def _publish(self, tmp_tag: str, tag: str):
        final, trash = self.root / tag, self.root / f"trash.{tag}"
        if final.is_dir():  # the same step saved before (a restarted run): set the old copy aside first
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
        _fsync_tree(self.root / tmp_tag)
        os.rename(self.root / tmp_tag, final)
        write_atomic(self.root / LATEST, tag.encode())
        fsync_path(self.root)
        for old in complete_tags(self.root)[:-self.keep_last]:
            os.rename(self.root / old, self.root / f"trash.{old}")  # never a half-deleted complete name
        self._sweep()

    def _sweep(self):
        """Deletes set-aside checkpoints and saves that a crash interrupted."""
        for leftover in [*self.root.glob("trash.step_*"), *self.root.glob("tmp.step_*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def clear(self):
        """Rank 0: removes every checkpoint of this run (a fresh start with checkpoint.resume=none)."""
        for tag in complete_tags(self.root):
            os.rename(self.root / tag, self.root / f"trash.{tag}")
        (self.root / LATEST).unlink(missing_ok=True)
        self._sweep()

    def load(self, engine, path: Path) -> dict:
        """Loads model, optimizer and scheduler of a verified checkpoint into ``engine``, every file weights-only;
        returns this rank's state."""
        path = Path(path)
        safe_load.install(engine)
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            fail(str(path), "a DeepSpeed checkpoint DeepSpeed can load", "one it cannot", RuntimeError)
        return safe_load.load(rank_file(path, self.rank))


def _fsync_tree(path: Path):
    for sub, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(sub, name))
        fsync_path(Path(sub))
