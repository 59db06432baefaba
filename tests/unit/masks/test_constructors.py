"""Each mask kind's to_dense() against an independent, loop-level definition."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bbm
from bbm.testing import random_doc_ids


def loop_mask(n_q, n_k, rule):
    return torch.tensor([[rule(i, j) for j in range(n_k)] for i in range(n_q)], dtype=torch.bool)


def doc_rule(doc, causal, window, prefix):
    def rule(i, j):
        if doc[i] != doc[j]:
            return False
        if prefix is not None and prefix[i]:
            return bool(prefix[j])
        if causal:
            return j <= i and (window is None or i - j < window)
        return window is None or abs(i - j) < window
    return rule


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_documents(causal, window):
    g = torch.Generator().manual_seed(int(causal) * 10 + (window or 0))
    doc = random_doc_ids(3, 77, 6, generator=g)
    mask = bbm.Mask.from_documents(doc, causal=causal, window=window)
    for b in range(3):
        want = loop_mask(77, 77, doc_rule(doc[b].tolist(), causal, window, None))
        assert torch.equal(mask.to_dense()[b, 0], want)


@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8), data=st.data())
@settings(max_examples=40, deadline=None)
def test_documents_prefix_property(lengths, data):
    doc = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(lengths)]).unsqueeze(0)
    prefix_lens = [data.draw(st.integers(0, n)) for n in lengths]
    prefix = torch.cat([torch.arange(n) < p for n, p in zip(lengths, prefix_lens)]).unsqueeze(0)
    window = data.draw(st.one_of(st.none(), st.integers(1, 10)))
    mask = bbm.Mask.from_documents(doc, window=window, prefix=prefix)
    n = doc.shape[1]
    want = loop_mask(n, n, doc_rule(doc[0].tolist(), True, window, prefix[0].tolist()))
    assert torch.equal(mask.to_dense()[0, 0], want)
    assert mask.allowed_pairs() == int(want.sum())
    assert mask.density == pytest.approx(want.float().mean().item())


def test_causal_and_bottom_right():
    assert torch.equal(bbm.Mask.causal(9).to_dense()[0, 0], loop_mask(9, 9, lambda i, j: j <= i))
    # Nq < Nk: queries are the last Nq positions
    assert torch.equal(bbm.Mask.causal(4, 10).to_dense()[0, 0], loop_mask(4, 10, lambda i, j: j <= i + 6))
    assert bbm.Mask.causal(9).exactly_causal and not bbm.Mask.causal(4, 10).exactly_causal
    w = bbm.Mask.causal(12, window=3).to_dense()[0, 0]
    assert torch.equal(w, loop_mask(12, 12, lambda i, j: 0 <= i - j < 3))


def test_sliding_window_and_prefix_lm():
    sw = bbm.Mask.sliding_window(20, 4, causal=False).to_dense()[0, 0]
    assert torch.equal(sw, loop_mask(20, 20, lambda i, j: abs(i - j) < 4))
    pl = bbm.Mask.prefix_lm(15, 6).to_dense()[0, 0]
    assert torch.equal(pl, loop_mask(15, 15, lambda i, j: j < 6 if i < 6 else j <= i))


def test_global_tokens():
    g, w, n = 3, 4, 25
    m = bbm.Mask.global_tokens(n, g, w).to_dense()[0, 0]
    assert torch.equal(m, loop_mask(n, n, lambda i, j: i < g or j < g or abs(i - j) < w))


def test_tree():
    parents = [-1, 0, 0, 1, 1, 2, -1, 6]
    prefix = 5
    def ancestors(i):
        out = {i}
        while parents[i] >= 0:
            i = parents[i]
            out.add(i)
        return out
    want = loop_mask(len(parents), prefix + len(parents), lambda i, j: j < prefix or (j - prefix) in ancestors(i))
    mask = bbm.Mask.tree(torch.tensor(parents), prefix)
    assert mask.shape == (1, 1, 8, 13)
    assert torch.equal(mask.to_dense()[0, 0], want)


def test_from_dense_and_ranges():
    allowed = torch.rand(2, 3, 10, 13) < 0.4
    assert torch.equal(bbm.Mask.from_dense(allowed).to_dense(), allowed)
    lo0 = torch.randint(0, 13, (2, 10))
    hi0 = lo0 + torch.randint(0, 5, (2, 10))
    lo1 = torch.randint(0, 13, (2, 10))
    hi1 = lo1 + torch.randint(0, 5, (2, 10))
    got = bbm.Mask.from_ranges(lo0, hi0, lo1, hi1, n_k=13).to_dense()[:, 0]
    j = torch.arange(13)
    want = ((j >= lo0[..., None]) & (j < hi0[..., None])) | ((j >= lo1[..., None]) & (j < hi1[..., None]))
    assert torch.equal(got, want)
    assert bbm.Mask.from_ranges(lo0, hi0, lo1, hi1, n_k=13).allowed_pairs() == int(want.sum())


def test_from_ranges_clamps_wide_bounds_before_narrowing():
    lo = torch.zeros(1, 3, dtype=torch.int64)
    hi = torch.tensor([[2**31, 2**32 + 1, -2**33]])
    mask = bbm.Mask.from_ranges(lo, hi, n_k=5)
    assert mask.to_dense()[0, 0].sum(-1).tolist() == [5, 5, 0]


def test_from_dense_takes_a_plain_square_mask():
    allowed = torch.rand(9, 7) < 0.5
    assert torch.equal(bbm.Mask.from_dense(allowed).to_dense(), allowed.view(1, 1, 9, 7))


def test_mask_keeps_how_it_was_built_from_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    prefix = torch.tensor([[True, True, False, True, False, False, False, False]])
    mask = bbm.Mask.from_documents(doc, prefix=prefix)
    assert mask.documents is doc and mask.prefix is prefix and mask.window is None and not mask.plain_documents
    assert mask.prefix_lengths().tolist() == [2, 1, 0]
    assert [t.tolist() for t in mask.document_spans()] == [[0, 3, 5], [3, 2, 3]]
    assert bbm.Mask.causal(8, window=3).window == 3 and bbm.Mask.sliding_window(8, 3).documents is not None


def test_document_prefix_is_a_fraction_of_each_document():
    from bbm.masks.documents import document_prefix
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 3, 3]])
    assert document_prefix(doc, 0.5).int().tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 1, 0]]
    assert not document_prefix(doc, 0.0).any()


@pytest.mark.parametrize("causal,window,prefixed", [(True, None, False), (False, None, False), (True, 5, False),
                                                    (False, 3, False), (True, None, True), (True, 4, True)])
def test_allowed_pairs_counted_on_the_host_equal_the_dense_count(causal, window, prefixed):
    from bbm.masks.documents import document_prefix
    from bbm.testing import random_doc_ids
    doc = random_doc_ids(2, 90, 7, generator=torch.Generator().manual_seed(3))
    doc[0, 10] = 99  # a one-token document
    prefix = document_prefix(doc, 0.6) if prefixed else None
    mask = bbm.Mask.from_documents(doc, causal=causal, window=window, prefix=prefix)
    assert mask.allowed_pairs() == int(mask.to_dense().sum())
