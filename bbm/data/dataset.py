"""A prepared dataset directory, read through a memory map:

    tokens.bin    every document's ids, end-of-document token included, back to back (dtype in meta.json)
    offsets.npy   int64 (num_documents + 1): document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json     format, key, source, tokenizer (kind, vocab_size, eod_id, pad_id, ...), dtype, counts

meta.json is written last and the directory is renamed into place after it, so a directory with a
meta.json is complete."""
import json
from pathlib import Path

import numpy as np

from bbm._checks import fail

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
        self.tokens = np.memmap(self.path / TOKENS, dtype=np.dtype(self.meta["dtype"]), mode="r",
                                shape=(self.num_tokens,))
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
