"""Tokenizers: byte-level (256 byte ids + an end-of-document id, no download) or a Hugging Face
``tokenizers`` tokenizer.json from a local path. ``encode`` returns one document's ids WITHOUT the
end-of-document token; preparation appends it."""
import hashlib
import os
from typing import List, Union

import numpy as np

from bbm._checks import fail

# Names a tokenizer.json commonly gives its end-of-text token; the first present is the end-of-document id.
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<eod>")
DTYPES = (np.uint8, np.uint16, np.uint32)


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; 256 ends a document and pads."""
    kind = "byte"
    vocab_size = 257
    eod_id = 256
    pad_id = 256

    def encode(self, text: Union[str, bytes], name: str = "text") -> np.ndarray:
        return np.frombuffer(_as_bytes(text, name), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: List[Union[str, bytes]], names: List[str]) -> List[np.ndarray]:
        return [self.encode(t, n) for t, n in zip(texts, names)]

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id, "pad_id": self.pad_id}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from a tokenizer.json. The end-of-document id is the first of
    ``EOD_NAMES`` in its vocabulary; a tokenizer without any gets ``<|endoftext|>`` added as a new id."""
    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = os.path.abspath(path)
        try:
            self.tok = Tokenizer.from_file(self.path)
        except Exception as e:   # the Rust side raises a plain Exception on a malformed file
            fail("data.tokenizer", "a readable Hugging Face tokenizer.json", f"{path!r} ({e})")
        self.eod_token = next((t for t in EOD_NAMES if self.tok.token_to_id(t) is not None), None)
        if self.eod_token is None:
            self.eod_token = EOD_NAMES[0]
            self.tok.add_special_tokens([self.eod_token])
        self.eod_id = self.pad_id = self.tok.token_to_id(self.eod_token)
        # Special tokens written in a document are its text, not control ids (only preparation ends documents).
        if hasattr(self.tok, "encode_special_tokens"):
            self.tok.encode_special_tokens = True
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()

    def encode(self, text: Union[str, bytes], name: str = "text") -> np.ndarray:
        return self.encode_batch([text], [name])[0]

    def encode_batch(self, texts: List[Union[str, bytes]], names: List[str]) -> List[np.ndarray]:
        strings = [_as_str(t, n, self.path) for t, n in zip(texts, names)]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(strings, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if i != self.eod_id], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "pad_id": self.pad_id, "eod_token": self.eod_token}


def load_tokenizer(spec: str):
    """``"byte"`` or a path to a tokenizer.json."""
    if not isinstance(spec, str):
        fail("data.tokenizer", "'byte' or a path to a tokenizer.json", repr(spec), TypeError)
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        fail("data.tokenizer", "'byte' or the path of an existing tokenizer.json", f"{spec!r} (not found)")
    return HFTokenizer(spec)


def token_dtype(vocab_size: int, requested=None) -> np.dtype:
    """The smallest unsigned dtype that holds every id, or ``requested`` if it holds them."""
    fits = [np.dtype(d) for d in DTYPES if vocab_size - 1 <= np.iinfo(d).max]
    if not fits:
        fail("vocab_size", f"at most {np.iinfo(DTYPES[-1]).max + 1} ids (uint32 tokens)", vocab_size)
    if requested is None:
        return fits[0]
    if np.dtype(requested) not in fits:
        fail("data.token_dtype", f"a dtype that holds vocab_size {vocab_size} ({fits[0].name} or wider)",
             repr(str(requested)))
    return np.dtype(requested)


def _as_bytes(text, name: str) -> bytes:
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(name, "text encodable as UTF-8", f"an unpaired surrogate at character {e.start}")


def _as_str(text, name: str, tokenizer_path: str) -> str:
    if isinstance(text, str):
        return text
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(name, f"UTF-8 text for the tokenizer {tokenizer_path}", f"undecodable bytes at offset {e.start}")
