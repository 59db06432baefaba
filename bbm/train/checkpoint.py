"""Crash-safe checkpoints through the DeepSpeed engine (any ZeRO stage).

Layout under ``<run dir>/checkpoints``::

    step_00000200/          a complete checkpoint (DeepSpeed's files + rank_00000.pt ... per-rank state)
    latest                  the name of the newest complete one
    tmp.step_00000300/      a save in progress (or one interrupted by a crash: ignored, later removed)

A save writes everything into ``tmp.<tag>``, waits for every rank, then rank 0 renames it to ``<tag>``
and replaces ``latest`` atomically, so a crash at any point leaves the previous checkpoint intact and
named by ``latest``. Old checkpoints beyond ``keep_last`` are renamed away before they are deleted.
"""
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from bbm._checks import fail
from bbm._files import fsync_path, write_atomic

TAG = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(root: Path):
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


def newest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if TAG.match(tag) and (root / tag).is_dir():
            return root / tag
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def resolve(resume: str, root: Path) -> Optional[Path]:
    """The checkpoint directory to resume from: ``auto`` (newest in this run, or None), ``none``, or a
    path to a checkpoint directory or to a folder of them."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest(root)
    path = Path(resume)
    if TAG.match(path.name) and path.is_dir():
        return path
    found = newest(path)
    if found is None:
        fail("checkpoint.resume", "a checkpoint directory (step_XXXXXXXX) or a folder holding one", str(path))
    return found


class Checkpointer:
    def __init__(self, root, keep_last: int, rank: int):
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_of(step)
        tmp_tag = f"tmp.{tag}"
        if self.rank == 0:
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)  # a leftover of an interrupted save
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, self.root / tmp_tag / f"rank_{self.rank:05d}.pt")
        dist.barrier()  # every rank's files are written
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

    def load(self, engine, path: Path):
        """Loads model, optimizer and scheduler into ``engine``; returns (client_state, this rank's state or None)."""
        path = Path(path)
        loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            fail("checkpoint", "a DeepSpeed checkpoint DeepSpeed can load", str(path), RuntimeError)
        rank_file = path / f"rank_{self.rank:05d}.pt"
        rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
        return client_state, rank_state


def _fsync_tree(path: Path):
    for sub, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(sub, name))
        fsync_path(Path(sub))
