"""A prepared dataset directory, read through a memory map:

    tokens.bin    every document's ids, end-of-document token included, back to back (dtype in meta.json)
    offsets.npy   int64 (num_documents + 1): document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json     format, key, source, tokenizer (kind, vocab_size, eod_id, pad_id, ...), dtype, counts, and
                  each data file's size and sha256
    verified.json (written on first use) the size, mtime and sha256 of each data file when it was last verified

meta.json is written last and the directory is renamed into place after it, so a directory with a
meta.json is complete.

Opening a dataset checks meta.json, and each data file's size against it (and tokens.bin's against the token
count and dtype), every time; it checks each file's sha256 on first use, and again whenever the file's size or
mtime differ from those recorded in verified.json (a file modified in the last ``RECENT_S`` seconds is not
recorded: a change within the filesystem's timestamp resolution could otherwise pass unseen). Any mismatch is
an error naming the file."""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bbm._checks import fail
from bbm._files import sha256_file, temp_path, write_atomic

FORMAT = "bbm-tokens-v2"
TOKENS, OFFSETS, META, VERIFIED = "tokens.bin", "offsets.npy", "meta.json", "verified.json"
DATA_FILES = (TOKENS, OFFSETS)
META_KEYS = ("format", "key", "dtype", "tokenizer", "num_tokens", "num_documents", "files")
RECENT_S = 2


def _again(path: Path) -> str:
    return f"; delete {path} to prepare it again"


def read_meta(path: Path) -> dict:
    """meta.json of the dataset directory ``path``, checked for the keys and types the dataset needs."""
    file = path / META
    if not file.is_file():
        fail("dataset_dir", f"a prepared dataset directory (with {META})", f"{str(path)!r} (no {file})")
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(str(file), "the JSON description of a prepared dataset", f"{type(e).__name__}: {e}{_again(path)}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        given = repr(meta.get("format")) if isinstance(meta, dict) else type(meta).__name__
        fail(str(file), f"format {FORMAT!r}", f"{given}{_again(path)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        fail(str(file), f"the keys {list(META_KEYS)}", f"no {missing}{_again(path)}")
    try:
        np.dtype(meta["dtype"])
    except TypeError:
        fail(str(file), "a numpy dtype name in 'dtype'", f"{meta['dtype']!r}{_again(path)}")
    files = meta["files"]
    if not (isinstance(files, dict) and all(isinstance(files.get(n), dict) and isinstance(files[n].get("size"), int)
                                            and isinstance(files[n].get("sha256"), str) for n in DATA_FILES)):
        fail(str(file), f"'files' with the size and sha256 of {list(DATA_FILES)}", f"{files!r}{_again(path)}")
    return meta


def verify_files(path: Path, meta: dict):
    """Sizes of the data files always; sha256 on first use and after a change of size or mtime (``verified.json``
    records what was verified; a read-only directory is verified at every open)."""
    stamp_file = path / VERIFIED
    try:
        stamps = json.loads(stamp_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        stamps = {}
    stamps = stamps if isinstance(stamps, dict) else {}
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected_tokens = int(meta["num_tokens"]) * itemsize
    changed = False
    for name in DATA_FILES:
        file, want = path / name, meta["files"][name]
        if not file.is_file():
            fail(str(file), f"a data file of the dataset ({want['size']} bytes)", f"no such file{_again(path)}")
        stat = file.stat()
        if stat.st_size != want["size"]:
            fail(str(file), f"{want['size']} bytes as meta.json records", f"{stat.st_size} bytes (truncated or "
                 f"replaced){_again(path)}")
        if name == TOKENS and stat.st_size != expected_tokens:
            fail(str(file), f"{meta['num_tokens']} tokens of {meta['dtype']} ({expected_tokens} bytes) as {path / META} "
                 "says", f"{stat.st_size} bytes (meta.json's dtype or counts do not match the file){_again(path)}")
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": want["sha256"]}
        if stamps.get(name) == seen:
            continue
        digest = sha256_file(file)
        if digest != want["sha256"]:
            fail(str(file), f"sha256 {want['sha256'][:16]}... as meta.json records", f"{digest[:16]}... (the file "
                 f"changed after it was prepared){_again(path)}")
        if stat.st_mtime_ns < time.time_ns() - RECENT_S * 10**9:
            stamps[name] = seen
            changed = True
    if changed:
        try:
            write_atomic(stamp_file, json.dumps(stamps, indent=1))
        except OSError:  # a read-only dataset: verified again at the next open
            pass


class TokenDataset:
    def __init__(self, path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        verify_files(self.path, self.meta)
        self.num_tokens = int(self.meta["num_tokens"])
        self.num_documents = int(self.meta["num_documents"])
        # A plain ndarray view of the memory map (indexing a np.memmap subclass costs more per call).
        self.tokens = np.asarray(np.memmap(self.path / TOKENS, dtype=np.dtype(self.meta["dtype"]), mode="r",
                                           shape=(self.num_tokens,)))
        self.offsets = np.load(self.path / OFFSETS, allow_pickle=False)
        if self.offsets.shape != (self.num_documents + 1,) or int(self.offsets[-1]) != self.num_tokens:
            fail(str(self.path / OFFSETS), f"{self.num_documents + 1} entries ending at {self.num_tokens}",
                 f"shape {self.offsets.shape} ending at {int(self.offsets[-1])}")
        tok = self.meta["tokenizer"]
        self.vocab_size, self.eod_id, self.pad_id = tok["vocab_size"], tok["eod_id"], tok["pad_id"]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[d]:self.offsets[d + 1]])


def finish_dataset(tmp: Path, lengths: np.ndarray, meta: dict):
    """Writes offsets.npy and, last, meta.json (with the counts and each data file's size and sha256) into a
    dataset directory being built."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(tmp / OFFSETS, offsets)
    files = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in DATA_FILES}
    meta.update(num_documents=len(lengths), num_tokens=int(offsets[-1]), files=files)
    (tmp / META).write_text(json.dumps(meta, indent=1))


def write_dataset(path, tokens: np.ndarray, lengths: np.ndarray, *, vocab_size: int, eod_id: int,
                  pad_id: int, source: str = "arrays") -> Path:
    """A dataset from token ids already in memory (each document's end-of-document token included), in the
    dtype of ``tokens``; written under a temporary name and renamed."""
    path = Path(path)
    tokens, lengths = np.ascontiguousarray(tokens), np.asarray(lengths, dtype=np.int64)
    if lengths.sum() != len(tokens) or (lengths < 1).any():
        fail("lengths", f"positive document lengths summing to len(tokens)={len(tokens)}", int(lengths.sum()))
    key = hashlib.sha256(tokens.tobytes() + lengths.tobytes()).hexdigest()
    tmp = temp_path(path)
    tmp.mkdir(parents=True)
    try:
        tokens.tofile(tmp / TOKENS)
        meta = {"format": FORMAT, "key": key, "source": {"kind": source}, "dtype": tokens.dtype.name,
                "tokenizer": {"kind": "ids", "vocab_size": vocab_size, "eod_id": eod_id, "pad_id": pad_id}}
        finish_dataset(tmp, lengths, meta)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
