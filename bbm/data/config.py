"""The ``data:`` section of a training config, one field per key."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from bbm._checks import check_positive_int, fail

SOURCES = ("stdlib", "text_dir", "jsonl", "parquet")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")


@dataclass
class DataConfig:
    source: str = "stdlib"        # "stdlib" | "text_dir" | "jsonl" | "parquet"
    path: Optional[str] = None    # directory / file / glob for text_dir, jsonl, parquet
    text_field: str = "text"      # jsonl key / parquet column holding the text
    tokenizer: str = "byte"       # "byte" or a path to a Hugging Face tokenizer.json
    cache_dir: str = ".cache/datasets"   # prepared datasets live here, keyed by source, files and tokenizer
    num_workers: int = 2          # tokenisation processes
    shuffle_buffer: int = 1024    # documents per best-fit-decreasing packing window
    prefetch: int = 2             # batches prepared ahead in a background thread (0: none)
    max_documents: Optional[int] = None   # take only the first documents of the source (tests, smoke runs)
    token_dtype: Optional[str] = None     # on-disk token dtype; None: the smallest that holds the vocabulary

    def __post_init__(self):
        if self.source not in SOURCES:
            fail("data.source", f"one of {SOURCES}", repr(self.source))
        if self.source != "stdlib" and not self.path:
            fail("data.path", f"a file, directory or glob for source {self.source!r}", repr(self.path))
        for name in ("text_field", "tokenizer", "cache_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                fail(f"data.{name}", "a non-empty string", repr(value), TypeError)
        check_positive_int("data.num_workers", self.num_workers)
        check_positive_int("data.shuffle_buffer", self.shuffle_buffer)
        check_positive_int("data.max_documents", self.max_documents, allow_none=True)
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            fail("data.prefetch", "an int >= 0", repr(self.prefetch))
        if self.token_dtype is not None and self.token_dtype not in TOKEN_DTYPES:
            fail("data.token_dtype", f"None or one of {TOKEN_DTYPES}", repr(self.token_dtype))

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "DataConfig":
        """Builds the config from a YAML ``data:`` mapping; an unknown key is an error, not a silent default."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            fail("data", f"keys among {sorted(known)}", f"unknown keys {unknown}")
        return cls(**values)
