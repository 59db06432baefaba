"""A checkpoint's manifest: ``manifest.json`` lists every other file of the checkpoint directory with its size
and sha256. A save writes it last, before the directory is renamed into place; a resume reads a checkpoint only
if every listed file is there with its size and hash and no other file is.

Hashing is shared out over the ranks (rank r hashes files r, r + world, ...; the directory is on a filesystem
that every rank sees) and gathered, so a save or a check costs each rank 1/world of the reading. Rank 0 alone
lists the directory (another host's view of a fresh directory may lag) and the others open files by name."""
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from bbm._files import fsync_path, sha256_file

MANIFEST = "manifest.json"
FORMAT = "bbm-checkpoint-v1"


def files_under(directory: Path) -> list:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    names = []
    for sub, _, files in os.walk(directory):
        names += [Path(sub, f).relative_to(directory).as_posix() for f in files]
    return sorted(n for n in names if n != MANIFEST)


def _gathered(values: dict) -> dict:
    """The union of every rank's ``values`` (a collective where a process group runs)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return {k: v for part in parts for k, v in part.items()}


def _my_share(names: list) -> list:
    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _listed_by_rank0(directory: Path) -> list:
    """Rank 0's ``files_under(directory)``, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return files_under(directory)
    names = [files_under(directory) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)
    return names[0]


def write(directory: Path, **info) -> dict:
    """Collective: hashes every file under ``directory``; rank 0 writes and flushes the manifest (with ``info``,
    e.g. the step) into it. Returns the manifest."""
    directory = Path(directory)
    names = _listed_by_rank0(directory)
    files = _gathered({n: {"size": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)}
                       for n in _my_share(names)})
    manifest = {"format": FORMAT, **info, "files": {n: files[n] for n in names}}
    if _rank() == 0:
        with open(directory / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(directory)
    return manifest


def read(directory: Path) -> dict:
    """The manifest of a checkpoint directory; an error naming it if it is missing or not a manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: expected the checkpoint's manifest, got no such file (an interrupted save, or a "
                         "checkpoint written before manifests)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected a JSON manifest, got {type(e).__name__}: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != FORMAT
            or not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                       for e in files.values())):
        raise ValueError(f"{path}: expected a manifest of format {FORMAT!r} listing each file's size and sha256, "
                         "got other JSON")
    return manifest


def problem(directory: Path) -> Optional[str]:
    """Collective: None if ``directory`` holds exactly the files its manifest lists, with their sizes and hashes;
    else why not, naming the first bad file (the same answer on every rank)."""
    reasons = _gathered({_rank(): _local_problem(Path(directory))})
    return next((reasons[r] for r in sorted(reasons) if reasons[r] is not None), None)


def _local_problem(directory: Path) -> Optional[str]:
    """This rank's finding: on rank 0 the manifest against the directory's files and sizes, on every rank its
    share of the hashes."""
    try:
        listed = read(directory)["files"]
    except ValueError as e:
        return str(e)
    try:
        if _rank() == 0:
            present = files_under(directory)
            missing = sorted(set(listed) - set(present))
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                return f"{directory / missing[0]}: listed in the manifest, missing{more}"
            extra = sorted(set(present) - set(listed))
            if extra:
                return f"{directory / extra[0]}: not in the manifest (a file added after the save)"
            for name in present:
                size = (directory / name).stat().st_size
                if size != listed[name]["size"]:
                    return f"{directory / name}: {size} bytes, the manifest says {listed[name]['size']}"
        for name in _my_share(sorted(listed)):
            if sha256_file(directory / name) != listed[name]["sha256"]:
                return f"{directory / name}: sha256 differs from the manifest's (the file changed after the save)"
    except OSError as e:
        return f"{e.filename}: unreadable ({e.strerror})"
    return None
