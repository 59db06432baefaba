"""Files that are either whole or absent: written under a temporary name, flushed to disk, then renamed; and their
checksums."""
import hashlib
import os
from pathlib import Path
from typing import Union


def fsync_path(path: Path):
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path``, per process, to write under before renaming to ``path``."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def write_atomic(path, data: Union[bytes, str]):
    """Replace ``path`` with ``data`` (str is written as UTF-8): a reader sees the old or the new file, never
    a part of it. The temporary name (``temp_path``) is per process, so concurrent writers do not collide."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
