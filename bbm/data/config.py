"""The ``data:`` section of a training config, one field per key."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from bbm._checks import fail
from bbm._config import check_fields, setting

SOURCES = ("stdlib", "text_dir", "jsonl", "parquet")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")


@dataclass
class DataConfig:
    """data: the corpus, its tokenizer and the held-out documents"""
    source: str = setting("stdlib", "where the text comes from (stdlib: the Python standard library's sources)",
                          choices=SOURCES)
    path: Optional[str] = setting(None, "directory / file / glob for text_dir, jsonl, parquet")
    text_field: str = setting("text", "jsonl key / parquet column holding the text")
    tokenizer: str = setting("byte", "'byte' or a path to a Hugging Face tokenizer.json")
    cache_dir: str = setting(".cache/datasets", "prepared datasets live here, keyed by source, files and tokenizer")
    num_workers: int = setting(2, "tokenisation processes", within="[1, inf)")
    shuffle_buffer: int = setting(1024, "documents per best-fit-decreasing packing window", within="[1, inf)")
    prefetch: int = setting(2, "batches prepared ahead in a background thread (0: none)", within="[0, inf)")
    max_documents: Optional[int] = setting(None, "take only the first documents of the source (tests, smoke runs)",
                                           within="[1, inf)")
    token_dtype: Optional[str] = setting(None, "on-disk token dtype; null: the smallest that holds the vocabulary",
                                         choices=TOKEN_DTYPES)
    eval_fraction: float = setting(0.01, "documents held out of training for evaluation (a fixed pseudo-random "
                                         "choice per document index)", within="[0, 1)")

    def __post_init__(self):
        check_fields(self, "data")
        if self.source != "stdlib" and not self.path:
            fail("data.path", f"a file, directory or glob for source {self.source!r}", repr(self.path))
        for name in ("text_field", "tokenizer", "cache_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                fail(f"data.{name}", "a non-empty string", repr(value), TypeError)

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "DataConfig":
        """Builds the config from a YAML ``data:`` mapping; an unknown key is an error, not a silent default."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            fail("data", f"keys among {sorted(known)}", f"unknown keys {unknown}")
        return cls(**values)
