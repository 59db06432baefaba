"""Preparation: tokenise a source once into a dataset directory (see ``bbm.data.dataset``) with several
processes and a progress bar. The directory is written under a temporary name and renamed at the end, so a
crash never leaves a dataset that looks complete; an exception removes the temporary directory, and the next
``prepare`` removes the ones left by processes that died on this host. A dataset directory without meta.json
(damaged: a complete one always has it) is removed and prepared again; an existing dataset is verified
(``bbm.data.dataset``) before it is used."""
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
from collections import deque
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bbm._checks import fail
from bbm.data.config import DataConfig
from bbm.data.dataset import FORMAT, META, TOKENS, finish_dataset, read_meta, verify_files
from bbm.data.sources import iter_documents, list_files
from bbm.data.tokenizer import load_tokenizer, token_dtype

BATCH_BYTES = 1 << 22   # text per worker task
BATCH_DOCS = 1024       # documents per worker task
_WORKER = {}            # the tokenizer of this process (set by _init_worker)


def prepare(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Tokenises ``cfg``'s source into ``cfg.cache_dir`` unless a dataset for the same source files
    (paths, sizes, mtimes), text field, document limit and tokenizer (content hash) is there already;
    returns the dataset directory."""
    if not isinstance(cfg, DataConfig):
        fail("cfg", "a bbm.data.DataConfig", type(cfg).__name__, TypeError)
    files = list_files(cfg.source, cfg.path)
    tok = load_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tok.vocab_size, cfg.token_dtype)
    source = {"kind": cfg.source, "path": os.path.abspath(cfg.path) if cfg.path else None,
              "text_field": cfg.text_field, "max_documents": cfg.max_documents}
    stats = [(str(f), s.st_size, s.st_mtime_ns) for f in files for s in [f.stat()]]
    key = hashlib.sha256(json.dumps([FORMAT, source, stats, tok.describe(), dtype.name]).encode()).hexdigest()
    cache = Path(cfg.cache_dir)
    final = cache / f"{cfg.source}-{tok.kind}-{key[:16]}"
    if (final / META).is_file():
        verify_files(final, read_meta(final))
        return final
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache, final.name)
    _remove_damaged(final)
    tmp = cache / f".{final.name}.tmp.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": FORMAT, "key": key, "source": source, "tokenizer": tok.describe(), "dtype": dtype.name}
        _write(tmp, meta, cfg, files, dtype, progress)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / META).is_file():   # not the loss of a race against another preparer
            raise OSError(e.errno, f"{final}: could not write the prepared dataset ({e.strerror})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write(tmp: Path, meta: dict, cfg: DataConfig, files, dtype, progress: bool):
    # Documents in source order, empty ones left out, at most max_documents of them.
    docs = (d for d in iter_documents(cfg.source, files, cfg.text_field) if d[1])
    docs = itertools.islice(docs, cfg.max_documents)
    one_per_file = cfg.source in ("stdlib", "text_dir")
    total = min(len(files), cfg.max_documents or len(files)) if one_per_file else cfg.max_documents
    lengths = []
    with open(tmp / TOKENS, "wb") as out, \
            tqdm(total=total, unit="doc", desc=f"prepare {cfg.source}", disable=not progress) as bar:
        for doc_lengths, flat in _encoded(_batches(docs), cfg.tokenizer, dtype, cfg.num_workers):
            flat.tofile(out)
            lengths.append(doc_lengths)
            bar.update(len(doc_lengths))
        bar.total = bar.n   # empty (and, for stdlib, non-UTF-8) files are not documents
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(lengths) == 0:
        fail("data.path", f"at least one non-empty document in source {cfg.source!r}",
             f"none in {cfg.path or 'the standard library'!r}")
    finish_dataset(tmp, lengths, meta)


def _batches(docs):
    """Groups documents into worker tasks of about BATCH_BYTES of text."""
    names, texts, size = [], [], 0
    for name, text in docs:
        names.append(name)
        texts.append(text)
        size += len(text)
        if size >= BATCH_BYTES or len(names) >= BATCH_DOCS:
            yield names, texts
            names, texts, size = [], [], 0
    if names:
        yield names, texts


def _encoded(batches, tokenizer: str, dtype, num_workers: int):
    """(document lengths, concatenated ids) per batch, in batch order; at most 2 tasks per worker in flight."""
    if num_workers == 1:
        _init_worker(tokenizer, dtype)
        yield from map(_encode, batches)
        return
    # Workers start from a fork server, never from this process, which may hold threads by now (tqdm, pyarrow)
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_workers, _init_worker, (tokenizer, dtype)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _init_worker(tokenizer: str, dtype):
    _WORKER["tok"], _WORKER["dtype"] = load_tokenizer(tokenizer), dtype


def _encode(batch):
    names, texts = batch
    tok = _WORKER["tok"]
    ids = tok.encode_batch(texts, names)
    eod = np.array([tok.eod_id])
    # Every document ends with the end-of-document token.
    flat = np.concatenate([part for doc in ids for part in (doc, eod)]).astype(_WORKER["dtype"])
    return np.array([len(doc) + 1 for doc in ids], dtype=np.int64), flat


def _remove_stale(cache: Path, name: str):
    """Removes temporary directories of ``name`` left by processes of this host that no longer run."""
    prefix = f".{name}.tmp.{socket.gethostname()}."
    for tmp in cache.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_damaged(final: Path):
    """Removes a dataset directory that has no meta.json (it lost it: a complete one always has it), so that a
    new one can be renamed into its place."""
    if not final.is_dir() or (final / META).is_file():
        return
    aside = final.with_name(f".{final.name}.damaged.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(final, aside)
    except FileNotFoundError:   # another preparer removed it first
        return
    if (aside / META).is_file():   # another preparer completed it meanwhile: put it back
        try:
            os.rename(aside, final)
        except OSError:
            shutil.rmtree(aside, ignore_errors=True)
        return
    print(f"prepare: {final} had no {META} (damaged); preparing it again", file=sys.stderr, flush=True)
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
