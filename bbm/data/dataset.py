"""A prepared dataset directory, read through a memory map:

    tokens.bin    every document's ids, end-of-document token included, back to back (dtype in meta.json)
    offsets.npy   int64 (num_documents + 1): document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json     format, key, source, tokenizer (kind, vocab_size, eod_id, pad_id, ...), dtype, counts

meta.json is written last and the directory is renamed into place after it, so a directory with a
meta.json is complete."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from bbm._checks import fail
from bbm._files import temp_path

FORMAT = "bbm-tokens-v1"
TOKENS, OFFSETS, META = "tokens.bin", "offsets.npy", "meta.json"


class TokenDataset:
    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / META).is_file():
            fail("dataset_dir", f"a prepared dataset directory (with {META})", repr(str(path)))
        self.meta = json.loads((self.path / META).read_text())
        if self.meta.get("format") != FORMAT:
            fail("dataset_dir", f"format {FORMAT!r}", repr(self.meta.get("format")))
        self.num_tokens = int(self.meta["num_tokens"])
        self.num_documents = int(self.meta["num_documents"])
        # A plain ndarray view of the memory map (indexing a np.memmap subclass costs more per call).
        self.tokens = np.asarray(np.memmap(self.path / TOKENS, dtype=np.dtype(self.meta["dtype"]), mode="r",
                                           shape=(self.num_tokens,)))
        self.offsets = np.load(self.path / OFFSETS)
        if self.offsets.shape != (self.num_documents + 1,) or int(self.offsets[-1]) != self.num_tokens:
            fail("dataset_dir", f"offsets.npy of {self.num_documents + 1} entries ending at {self.num_tokens}",
                 f"shape {self.offsets.shape} ending at {int(self.offsets[-1])}")
        tok = self.meta["tokenizer"]
        self.vocab_size, self.eod_id, self.pad_id = tok["vocab_size"], tok["eod_id"], tok["pad_id"]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[d]:self.offsets[d + 1]])


def finish_dataset(tmp: Path, lengths: np.ndarray, meta: dict):
    """Writes offsets.npy and, last, meta.json (with the counts) into a dataset directory being built."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(tmp / OFFSETS, offsets)
    meta.update(num_documents=len(lengths), num_tokens=int(offsets[-1]))
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
