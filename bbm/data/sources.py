"""Document sources: each yields ``(name, text)`` pairs in a fixed order; ``name`` says where a document came
from (``file``, ``file:line`` or ``file:row``) so that every error can point at it.

text_dir and stdlib yield raw ``bytes`` (the byte tokenizer needs no decoding; a text tokenizer decodes and
names the file when that fails); jsonl and parquet yield ``str``."""
import glob
import json
import os
from pathlib import Path
from typing import Iterator, List, Tuple, Union

from bbm._checks import fail

Document = Tuple[str, Union[str, bytes]]
# Suffixes taken from a directory (a file or a glob is taken whatever its name).
DIR_SUFFIXES = {"text_dir": None, "jsonl": (".jsonl",), "parquet": (".parquet",)}
# The standard library's installed third-party packages are not part of the embedded corpus.
STDLIB_EXCLUDE = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    return Path(os.path.dirname(os.__file__))


def list_files(source: str, path) -> List[Path]:
    """The files of a source, sorted by path so that every machine reads them in the same order."""
    if source == "stdlib":
        root = stdlib_root()
        files = []
        for folder, subdirs, names in os.walk(root):
            if folder == str(root):   # installed packages are not the standard library
                subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDE]
            files += [Path(folder, n) for n in names if n.endswith(".py")]
        return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    path = str(path)
    if glob.has_magic(path):
        files = [Path(p) for p in glob.glob(path, recursive=True)]
    elif os.path.isdir(path):
        suffixes = DIR_SUFFIXES[source]
        files = [p for p in Path(path).rglob("*")
                 if not any(part.startswith(".") for part in p.relative_to(path).parts)
                 and (suffixes is None or p.name.endswith(suffixes))]
    elif os.path.isfile(path):
        files = [Path(path)]
    else:
        fail("data.path", f"an existing file, directory or glob for source {source!r}", f"{path!r} (not found)")
    files = sorted((p for p in files if p.is_file()), key=lambda p: p.as_posix())
    if not files:
        what = "files" if DIR_SUFFIXES[source] is None else f"{DIR_SUFFIXES[source][0]} files"
        fail("data.path", f"at least one of the {what} for source {source!r}", f"none in {path!r}")
    return files


def iter_documents(source: str, files: List[Path], text_field: str) -> Iterator[Document]:
    """Every document of the source, in file order then line / row order."""
    read = {"stdlib": _read_stdlib, "text_dir": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}[source]
    for f in files:
        yield from read(f, text_field)


def _read_text(path: Path, text_field: str) -> Iterator[Document]:
    yield str(path), path.read_bytes()


def _read_stdlib(path: Path, text_field: str) -> Iterator[Document]:
    # Four test files of the standard library are deliberately not UTF-8; they are left out for every tokenizer
    # so that the corpus is the same whichever tokenizer reads it.
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return
    yield str(path), data


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError as e:   # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                fail(where, "one JSON object per line", f"invalid JSON ({e})")
            if not isinstance(record, dict) or text_field not in record:
                given = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                fail(where, f"a JSON object with the text field {text_field!r} (data.text_field)", given)
            yield where, _check_str(where, record[text_field])


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        fail(str(path), f"a column {text_field!r} (data.text_field)", f"columns {names}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            yield where, _check_str(where, value)
            row += 1


def _check_str(where: str, value) -> str:
    if not isinstance(value, str):
        fail(where, "a string in the text field", type(value).__name__, TypeError)
    return value
