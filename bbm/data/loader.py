"""PackedLoader: an endless, deterministic stream of packed batches for one data-parallel rank.

The stream of sequences depends only on (dataset, seq_len, shuffle_buffer, seed): epoch e shuffles the
documents with ``default_rng([seed, e])``, splits the long ones and packs them window after window
(``bbm.data.packing``). Global batch g is the next ``world_size * batch_size`` sequences of that stream and
rank r takes the r-th ``batch_size`` of them, so ranks are disjoint and together read every sequence once per
epoch; a batch may straddle two epochs (nothing is dropped or repeated).

A position is (epoch, window, index of the next sequence in the window), windows counted from 0 among those
that hold sequences. Resuming replays the planning (not the tokens) of that epoch up to it, so a resumed run
reads exactly the batches it would have read, even with another batch size or world size.

Held-out documents: with ``eval_fraction`` f, each document is held out for evaluation with probability f, by a
fixed pseudo-random draw per document index (``held_out``); ``split="train"`` streams the others, ``split="eval"``
those. The draw of a document does not depend on how many documents follow it, so a held-out document stays held
out when the dataset grows (a larger data.max_documents)."""
import queue
import threading

import numpy as np
import torch

from bbm._checks import check_positive_int, fail
from bbm.data.dataset import TokenDataset
from bbm.data.packing import materialize, pack_windows, split_documents

STATE_KEYS = ("epoch", "window", "index", "seed", "seq_len", "shuffle_buffer", "dataset")
SPLITS = ("train", "eval")
HELD_OUT_SEED = 0x5EED_E7A1  # the stream of per-document draws (any fixed number: the choice must never change)


def held_out(num_documents: int, eval_fraction: float) -> np.ndarray:
    """Boolean per document: True for the documents held out of training for evaluation. Document d is held out
    when the d-th draw of a fixed uniform stream is below ``eval_fraction``."""
    return np.random.default_rng(HELD_OUT_SEED).random(num_documents) < eval_fraction


def split_documents_of(dataset: TokenDataset, eval_fraction: float, split: str) -> np.ndarray:
    """Indices of the documents of ``split`` ('train' or 'eval'); fails if the split would be empty."""
    if split not in SPLITS:
        fail("split", f"one of {SPLITS}", repr(split))
    if not 0 <= eval_fraction < 1:
        fail("eval_fraction", "a fraction in [0, 1)", repr(eval_fraction))
    mask = held_out(dataset.num_documents, eval_fraction)
    documents = np.flatnonzero(mask if split == "eval" else ~mask)
    if len(documents) == 0:
        n = dataset.num_documents
        want = (f"a fraction that holds out one of the dataset's {n} documents at least (or eval.every=0: no "
                "evaluation)" if split == "eval" else f"a fraction that leaves training documents among the {n}")
        fail("data.eval_fraction", want, eval_fraction)
    return documents


class _Cursor:
    """Walks the sequence stream from a position; ``take(k)`` returns the next k sequences' pieces."""

    def __init__(self, dataset: TokenDataset, documents: np.ndarray, seq_len: int, shuffle_buffer: int, seed: int,
                 position: dict):
        self.dataset, self.documents, self.seq_len = dataset, documents, seq_len
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self._open_epoch(position["epoch"])
        while self.window < position["window"]:
            self._next_window(within_epoch=position["epoch"])
        if self.window != position["window"] or position["index"] >= len(self.seq_ptr) - 1:
            fail("state", f"a position inside epoch {position['epoch']} of this dataset", str(position))
        self.index = position["index"]

    def position(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "index": self.index}

    def _open_epoch(self, epoch: int):
        # The epoch's document order, its pieces (absolute token ranges) and its lazily packed windows.
        rng = np.random.default_rng([self.seed, epoch])
        perm = self.documents[rng.permutation(len(self.documents))]
        offsets = self.dataset.offsets
        doc, offset, self.lengths = split_documents(self.dataset.lengths[perm], self.seq_len)
        doc = perm[doc]
        self.starts, self.doc_ends = offsets[doc] + offset, offsets[doc + 1]
        self.windows = pack_windows(self.lengths, self.seq_len, self.shuffle_buffer, rng)
        self.epoch, self.window = epoch, -1
        self._next_window()

    def _next_window(self, within_epoch=None):
        # The next window that holds a sequence (a window can hand all its pieces over to the next one);
        # windows are numbered counting only those.
        for pieces, seq_ptr in self.windows:
            if len(seq_ptr) > 1:
                self.pieces, self.seq_ptr, self.window, self.index = pieces, seq_ptr, self.window + 1, 0
                return
        if within_epoch is not None:
            fail("state", f"a position inside epoch {within_epoch} of this dataset", f"window > {self.window}")
        self._open_epoch(self.epoch + 1)

    def take(self, k: int):
        """(starts, lengths, doc_ends, seq_ptr) of the next k sequences."""
        parts, ptrs, used = [], [np.zeros(1, np.int64)], 0
        while k:
            m = min(k, len(self.seq_ptr) - 1 - self.index)
            a, b = self.seq_ptr[self.index], self.seq_ptr[self.index + m]
            p = self.pieces[a:b]
            parts.append((self.starts[p], self.lengths[p], self.doc_ends[p]))
            ptrs.append(self.seq_ptr[self.index + 1:self.index + m + 1] - a + used)
            used += b - a
            self.index += m
            k -= m
            if self.index == len(self.seq_ptr) - 1:
                self._next_window()
        starts, lengths, doc_ends = (np.concatenate(c) for c in zip(*parts))
        return starts, lengths, doc_ends, np.concatenate(ptrs)


class PackedLoader:
    """Yields dicts of CPU tensors, each (batch_size, seq_len): ``tokens``, ``labels``, ``position_ids``
    (int64) and ``doc_ids`` (int32), with the conventions of ``bbm.data.packing``. Infinite over epochs;
    ``state_dict()`` is the position after the last batch handed out (prefetched batches don't count).
    ``eval_fraction`` and ``split``: the documents it reads (see the module's docstring)."""

    def __init__(self, dataset_dir, seq_len: int, batch_size: int, *, rank=0, world_size=1, seed=0,
                 shuffle_buffer=1024, prefetch=2, eval_fraction=0.0, split="train"):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size),
                            ("shuffle_buffer", shuffle_buffer)):
            check_positive_int(name, value)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            fail("rank", f"an int in [0, world_size={world_size})", repr(rank))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            fail("seed", "an int >= 0", repr(seed))
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            fail("prefetch", "an int >= 0", repr(prefetch))
        self.dataset = TokenDataset(dataset_dir)
        self.eval_fraction, self.split = eval_fraction, split
        self.documents = split_documents_of(self.dataset, eval_fraction, split)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.prefetch = seed, shuffle_buffer, prefetch
        self.vocab_size, self.eod_id, self.pad_id = self.dataset.vocab_size, self.dataset.eod_id, self.dataset.pad_id
        self._position = {"epoch": 0, "window": 0, "index": 0}

    @classmethod
    def from_config(cls, cfg, seq_len: int, batch_size: int, **kwargs) -> "PackedLoader":
        """Prepares ``cfg`` (a DataConfig) if needed and reads it with its shuffle_buffer and prefetch."""
        from bbm.data.build import prepare

        return cls(prepare(cfg), seq_len, batch_size, shuffle_buffer=cfg.shuffle_buffer, prefetch=cfg.prefetch,
                   eval_fraction=cfg.eval_fraction, **kwargs)

    @property
    def epoch(self) -> int:
        return self._position["epoch"]

    def __iter__(self):
        cursor = _Cursor(self.dataset, self.documents, self.seq_len, self.shuffle_buffer, self.seed, self._position)
        batches = self._batches(cursor)
        if self.prefetch:
            batches = _prefetched(batches, self.prefetch)
        for batch, position in batches:
            self._position = position
            yield batch

    def _batches(self, cursor: _Cursor):
        before, mine, after = self.rank * self.batch_size, self.batch_size, \
            (self.world_size - 1 - self.rank) * self.batch_size
        while True:
            # This rank's share of the next global batch.
            if before:
                cursor.take(before)
            starts, lengths, doc_ends, seq_ptr = cursor.take(mine)
            if after:
                cursor.take(after)
            arrays = materialize(self.dataset.tokens, starts, lengths, doc_ends, seq_ptr, self.seq_len, self.pad_id)
            yield {k: torch.from_numpy(v) for k, v in arrays.items()}, cursor.position()

    def state_dict(self) -> dict:
        return dict(self._position, seed=self.seed, seq_len=self.seq_len, shuffle_buffer=self.shuffle_buffer,
                    dataset=self.dataset.meta["key"], eval_fraction=self.eval_fraction, split=self.split)

    def load_state_dict(self, state: dict):
        """Restores the position and seed; iterators created afterwards continue from there. A state without
        ``eval_fraction`` and ``split`` (saved before documents were held out) read every document."""
        if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
            fail("state", f"a dict with keys {list(STATE_KEYS)}", repr(state))
        state = {"eval_fraction": 0.0, "split": "train", **state}
        mine = {"seq_len": self.seq_len, "shuffle_buffer": self.shuffle_buffer, "dataset": self.dataset.meta["key"],
                "eval_fraction": self.eval_fraction, "split": self.split}
        for key, value in mine.items():
            if state[key] != value:
                fail(f"state[{key!r}]", f"{value!r} as in this loader", repr(state[key]))
        self.seed = int(state["seed"])
        self._position = {k: int(state[k]) for k in ("epoch", "window", "index")}


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _prefetched(items, depth: int):
    """Runs the generator ``items`` in a daemon thread, ``depth`` items ahead; stops it when closed."""
    q = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:   # handed to the consumer, which re-raises it
            put(_Failure(e))

    worker = threading.Thread(target=work, daemon=True, name="bbm-data-prefetch")
    worker.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()  # the thread notices `stop` within 0.1 s; joining it keeps interpreter exit clean
