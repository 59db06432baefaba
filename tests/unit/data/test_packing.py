"""Packing: best-fit-decreasing against a naive loop, splitting, windows, and the materialised
tokens / labels / positions / doc ids against their definitions (token values = their source positions)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bbm.data.packing import best_fit_decreasing, materialize, pack_windows, split_documents

PROPS = settings(max_examples=60, deadline=None)


def naive_best_fit_decreasing(lengths, capacity):
    """Longest first (stable), each into the open bin with the least room that fits (ties: the older)."""
    rooms, bins = [], [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [(room, b) for b, room in enumerate(rooms) if room >= lengths[i]]
        b = min(fits)[1] if fits else len(rooms)
        if not fits:
            rooms.append(capacity)
        rooms[b] -= lengths[i]
        bins[i] = b
    return bins, len(rooms)


@st.composite
def items(draw):
    capacity = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=80))
    return np.array(lengths, dtype=np.int64), capacity


@PROPS
@given(items())
def test_best_fit_decreasing_matches_naive(case):
    lengths, capacity = case
    bins, n_bins = best_fit_decreasing(lengths, capacity)
    ref_bins, ref_n = naive_best_fit_decreasing(lengths.tolist(), capacity)
    assert (bins.tolist(), n_bins) == (ref_bins, ref_n)
    fill = np.bincount(bins, weights=lengths, minlength=n_bins)
    assert fill.max(initial=0) <= capacity and fill.sum() == lengths.sum()
    # Any-fit property: no two bins could have been merged (so at most one is at most half full).
    lowest = np.sort(fill)[:2]
    assert n_bins < 2 or lowest.sum() > capacity


@PROPS
@given(st.lists(st.integers(1, 500), max_size=60), st.integers(1, 128))
def test_split_documents(lengths, seq_len):
    doc, offset, length = split_documents(np.array(lengths, dtype=np.int64), seq_len)
    assert np.bincount(doc, weights=length, minlength=len(lengths)).tolist() == lengths
    assert (length >= 1).all() and (length <= seq_len).all()
    for d, n in enumerate(lengths):
        mine = doc == d
        assert offset[mine].tolist() == list(range(0, n, seq_len))


@PROPS
@given(st.lists(st.integers(1, 200), min_size=1, max_size=120), st.integers(16, 200), st.integers(1, 20),
       st.integers(0, 2 ** 16))
def test_pack_windows_uses_each_piece_once(lengths, seq_len, window, seed):
    lengths = np.minimum(np.array(lengths, dtype=np.int64), seq_len)
    got, n_windows = [], 0
    for pieces, seq_ptr in pack_windows(lengths, seq_len, window, np.random.default_rng(seed)):
        n_windows += 1
        fill = np.add.reduceat(lengths[pieces], seq_ptr[:-1]) if len(pieces) else []
        assert seq_ptr[0] == 0 and seq_ptr[-1] == len(pieces) and (np.diff(seq_ptr) > 0).all()
        assert all(f <= seq_len for f in fill)
        got += pieces.tolist()
    assert sorted(got) == list(range(len(lengths))) and n_windows == -(-len(lengths) // window)


def check_sequences(out, doc_starts, doc_ends, seq_len, pad_id):
    """The source tokens are their own positions (tokens[p] == p), so every placement is checkable."""
    for row in range(out["tokens"].shape[0]):
        tok, lab, pos, ids = (out[k][row] for k in ("tokens", "labels", "position_ids", "doc_ids"))
        runs = np.flatnonzero(np.diff(ids, prepend=-1)).tolist() + [seq_len]
        assert ids[runs[:-1]].tolist() == list(range(len(runs) - 1))   # ids 0, 1, ... in contiguous runs
        for a, b in zip(runs[:-1], runs[1:]):
            assert pos[a:b].tolist() == list(range(b - a))   # positions restart at every piece
            if tok[a] == pad_id:   # padding: one run at the end, never trained on
                assert b == seq_len and (tok[a:b] == pad_id).all() and (lab[a:b] == -100).all()
                continue
            src = tok[a:b]
            d = np.searchsorted(doc_starts, src[0], side="right") - 1
            assert (src == np.arange(src[0], src[0] + b - a)).all() and src[-1] < doc_ends[d]
            assert (src[0] - doc_starts[d]) % seq_len == 0   # a piece starts at a chunk boundary
            nxt = src + 1
            assert lab[a:b].tolist() == np.where(nxt < doc_ends[d], nxt, -100).tolist()


@PROPS
@given(st.lists(st.integers(1, 90), min_size=1, max_size=50), st.integers(4, 40), st.integers(1, 8),
       st.integers(0, 2 ** 16))
def test_materialize_against_definitions(lengths, seq_len, window, seed):
    lengths = np.array(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(offsets[-1], dtype=np.uint16)   # an unsigned on-disk dtype, as in a dataset
    pad_id = -7
    doc, off, plen = split_documents(lengths, seq_len)
    seen = []
    for pieces, seq_ptr in pack_windows(plen, seq_len, window, np.random.default_rng(seed)):
        d = doc[pieces]
        out = materialize(tokens, offsets[d] + off[pieces], plen[pieces], offsets[d + 1], seq_ptr, seq_len, pad_id)
        assert {k: v.shape for k, v in out.items()} == {k: (len(seq_ptr) - 1, seq_len) for k in out}
        assert out["doc_ids"].dtype == np.int32 and out["tokens"].dtype == np.int64
        check_sequences(out, offsets[:-1], offsets[1:], seq_len, pad_id)
        seen += out["tokens"][out["tokens"] != pad_id].tolist()
    assert sorted(seen) == tokens.tolist()   # every token exactly once


def test_bad_lengths():
    with pytest.raises(ValueError, match=r"lengths: expected item lengths in \[1, 8\], got range \[1, 9\]"):
        best_fit_decreasing(np.array([1, 9]), 8)
    with pytest.raises(ValueError, match="lengths: expected document lengths >= 1"):
        split_documents(np.array([3, 0]), 8)
    with pytest.raises(ValueError, match="lengths: expected at most seq_len=4 tokens per sequence, got 5"):
        materialize(np.arange(10), [0, 5], [3, 2], [3, 7], [0, 2], 4, 0)
