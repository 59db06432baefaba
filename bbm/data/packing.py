"""Packing documents into sequences of ``seq_len`` tokens.

1. ``split_documents``: a document longer than ``seq_len`` becomes chunks of ``seq_len`` tokens and a
   shorter remainder ("pieces"); a full chunk is a sequence by itself.
2. ``best_fit_decreasing``: the pieces of one shuffle window go, longest first, into the open sequence
   with the least room that still fits them (bisect over a sorted list of remaining capacities).
3. ``pack_window``: the window's sequences in a random order, as a flat list of pieces plus pointers;
   ``pack_windows`` runs it window after window, carrying the least-filled sequence's pieces over to the
   next window instead of padding it (the non-padding share it reaches: benchmarks/packing.py).
4. ``materialize``: tokens, labels, position ids and document ids of some sequences, all vectorised.

Conventions of the materialised sequences (what ``bbm.Mask.from_documents`` and the loss expect):
- ``labels[t]`` is the next token of the same document, or -100 on a document's last token (its
  end-of-document token, whose next token would come from another document) and on padding. A chunk that
  is cut from a longer document keeps the true next token as the label of its last position: it is the same
  document, read from the token array.
- ``position_ids`` restart at 0 at every piece, also at a chunk that continues a document: a chunk is a
  separate sequence whose attention cannot see the earlier chunks, so its positions start at 0 like any
  document's (and RoPE never sees positions >= seq_len).
- ``doc_ids`` number the pieces of a sequence 0, 1, ...; padding (at the end) is one more document of its own,
  with positions from 0 and labels -100, so it attends nothing else and is never trained on."""
from bisect import bisect_left, insort

import numpy as np

from bbm._checks import fail

IGNORE_INDEX = -100  # the label of tokens with no next token to predict (the model's loss skips it)

_SHIFT = 32   # a capacity key is (remaining room << 32) | sequence index


def split_documents(lengths: np.ndarray, seq_len: int):
    """Per piece: (document index, offset inside the document, length); chunks of a document are adjacent."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        fail("lengths", "document lengths >= 1", f"minimum {lengths.min()}")
    # Chunks per document, then each chunk's index inside its document.
    n_chunks = -(-lengths // seq_len)
    doc = np.repeat(np.arange(len(lengths)), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    offset = (np.arange(len(doc)) - first[doc]) * seq_len
    return doc, offset, np.minimum(seq_len, lengths[doc] - offset)


def best_fit_decreasing(lengths: np.ndarray, capacity: int):
    """Bins items (1 <= length <= capacity) longest first, each into the open bin with the least room that
    fits it (ties: the older bin), else a new bin. Returns (bin of each item, number of bins); bins are
    numbered in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        fail("lengths", f"item lengths in [1, {capacity}]", f"range [{lengths.min()}, {lengths.max()}]")
    order = np.argsort(-lengths, kind="stable")
    # Items that fill a bin exactly come first in the order and get a bin each.
    n_full = int(np.count_nonzero(lengths == capacity))
    bins = np.empty(len(lengths), dtype=np.int64)
    bins[order[:n_full]] = np.arange(n_full)
    rest = order[n_full:]
    placed = []
    open_keys = []   # sorted keys of the bins with room left
    n_bins = n_full
    for length in lengths[rest].tolist():
        # The first key >= (length << 32) is the bin with the least room that still fits.
        j = bisect_left(open_keys, length << _SHIFT)
        if j < len(open_keys):
            key = open_keys.pop(j)
            b, room = key & ((1 << _SHIFT) - 1), (key >> _SHIFT) - length
        else:
            b, room = n_bins, capacity - length
            n_bins += 1
        placed.append(b)
        if room:
            insort(open_keys, (room << _SHIFT) | b)
    bins[rest] = placed
    return bins, n_bins


def pack_window(lengths: np.ndarray, seq_len: int, rng: np.random.Generator):
    """Packs one window of pieces. Returns (piece order, seq_ptr): sequence s holds the pieces
    ``order[seq_ptr[s]:seq_ptr[s + 1]]`` (longest first); the sequences are in a random order."""
    bins, n_bins = best_fit_decreasing(lengths, seq_len)
    rank = rng.permutation(n_bins)[bins]
    # Group pieces by their sequence's random rank, keeping the longest-first order inside a sequence.
    by_length = np.argsort(-np.asarray(lengths), kind="stable")
    order = by_length[np.argsort(rank[by_length], kind="stable")]
    seq_ptr = np.concatenate([[0], np.cumsum(np.bincount(rank, minlength=n_bins))])
    return order, seq_ptr


def pack_windows(lengths: np.ndarray, seq_len: int, window: int, rng: np.random.Generator):
    """Packs pieces (in their given, already shuffled order) window by window; yields (pieces, seq_ptr) per
    window: sequence s holds pieces ``pieces[seq_ptr[s]:seq_ptr[s + 1]]``. A window packs the next ``window``
    pieces plus the pieces of the previous window's least-filled sequence, which is carried over instead of
    being padded (unless it is full, or the window is the last)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    carry = np.zeros(0, dtype=np.int64)
    for first in range(0, len(lengths), window):
        idx = np.concatenate([carry, np.arange(first, min(first + window, len(lengths)))])
        order, seq_ptr = pack_window(lengths[idx], seq_len, rng)
        pieces = idx[order]
        cum = np.concatenate([[0], np.cumsum(lengths[pieces])])
        fill = cum[seq_ptr[1:]] - cum[seq_ptr[:-1]]
        # The least-filled sequence goes back into the pool of the next window.
        s = int(np.argmin(fill))
        carry = np.zeros(0, dtype=np.int64)
        if first + window < len(lengths) and fill[s] < seq_len:
            carry = pieces[seq_ptr[s]:seq_ptr[s + 1]]
            pieces = np.concatenate([pieces[:seq_ptr[s]], pieces[seq_ptr[s + 1]:]])
            seq_ptr = np.concatenate([seq_ptr[:s + 1], seq_ptr[s + 2:] - len(carry)])
        yield pieces, seq_ptr


def materialize(tokens, starts, lengths, doc_ends, seq_ptr, seq_len: int, pad_id: int) -> dict:
    """Sequences s = 0..S-1 made of pieces ``seq_ptr[s]:seq_ptr[s + 1]``; piece p is
    ``tokens[starts[p]:starts[p] + lengths[p]]`` of a document ending at ``doc_ends[p]`` (exclusive).
    Returns int64 tokens / labels / position_ids and int32 doc_ids, each (S, seq_len)."""
    starts, lengths, doc_ends, seq_ptr = (np.asarray(a, dtype=np.int64) for a in (starts, lengths, doc_ends, seq_ptr))
    n_seq, n_pieces = len(seq_ptr) - 1, np.diff(seq_ptr)
    cum = np.concatenate([[0], np.cumsum(lengths)])
    fill = cum[seq_ptr[1:]] - cum[seq_ptr[:-1]]
    if (fill > seq_len).any():
        fail("lengths", f"at most seq_len={seq_len} tokens per sequence", f"{int(fill.max())}")
    # Segments in output order: each sequence's pieces, then its padding (maybe empty); segment i of a
    # sequence is its document i.
    piece_seg = np.arange(len(lengths)) + np.repeat(np.arange(n_seq), n_pieces)
    pad_seg = seq_ptr[1:] + np.arange(n_seq)
    seg_len, seg_start, seg_doc = (np.zeros(len(lengths) + n_seq, dtype=t) for t in (np.int64, np.int64, np.int32))
    seg_len[piece_seg], seg_len[pad_seg] = lengths, seq_len - fill
    seg_start[piece_seg] = starts
    seg_doc[piece_seg], seg_doc[pad_seg] = np.arange(len(lengths)) - np.repeat(seq_ptr[:-1], n_pieces), n_pieces
    seg_first = np.cumsum(seg_len) - seg_len
    # Per output token: its position inside its segment, and where it comes from.
    position = np.arange(n_seq * seq_len) - np.repeat(seg_first, seg_len)
    token = np.take(tokens, np.repeat(seg_start, seg_len) + position, mode="clip").astype(np.int64)   # clip: padding
    # Labels: the next token inside a piece; at a piece's end, the document's next token or -100.
    label = np.empty_like(token)
    label[:-1] = token[1:]
    after = starts + lengths
    has_next = after < doc_ends
    following = tokens[np.where(has_next, after, 0)].astype(np.int64)
    label[seg_first[piece_seg] + lengths - 1] = np.where(has_next, following, IGNORE_INDEX)
    out = {"tokens": token.reshape(n_seq, seq_len), "labels": label.reshape(n_seq, seq_len),
           "position_ids": position.reshape(n_seq, seq_len),
           "doc_ids": np.repeat(seg_doc, seg_len).reshape(n_seq, seq_len)}
    # Padding: the pad id, never a label.
    padding = np.arange(seq_len)[None, :] >= fill[:, None]
    out["tokens"][padding], out["labels"][padding] = pad_id, IGNORE_INDEX
    return out
