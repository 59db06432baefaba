"""PackedLoader on a prepared byte-level corpus: an epoch is the corpus, batch conventions, determinism,
resume, data-parallel ranks, prefetch thread shutdown, bad input."""
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

import bbm
from bbm.data import DataConfig, PackedLoader, TokenDataset

from helpers.data import SEQ_LEN

EOD = 256


def make(ds, batch_size=1, **kw):
    kw.setdefault("shuffle_buffer", 8)
    return PackedLoader(ds, SEQ_LEN, batch_size, **kw)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def runs(row_doc_ids):
    """(start, end) of each document run of a row."""
    cuts = np.flatnonzero(np.diff(row_doc_ids, prepend=-1)).tolist() + [len(row_doc_ids)]
    return list(zip(cuts[:-1], cuts[1:]))


def pieces(batches):
    """Counter of the non-padding pieces (token tuples) of the batches; padding starts with the pad id."""
    got = Counter()
    for b in batches:
        for tok, ids in zip(b["tokens"].numpy(), b["doc_ids"].numpy()):
            got.update(tuple(tok[a:e]) for a, e in runs(ids) if tok[a] != EOD)
    return got


def source_chunks(ds):
    """Every document cut into SEQ_LEN chunks -> the token that follows the chunk (-100 at the end)."""
    chunks = {}
    for d in range(ds.num_documents):
        doc = ds.document(d).tolist()
        for k in range(0, len(doc), SEQ_LEN):
            chunks[tuple(doc[k:k + SEQ_LEN])] = doc[k + SEQ_LEN] if k + SEQ_LEN < len(doc) else -100
    return chunks


def equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_an_epoch_is_the_corpus(byte_dataset):
    """Over one epoch every chunk of every document comes exactly once; then epoch 1 starts."""
    ds = TokenDataset(byte_dataset)
    loader = make(byte_dataset)
    batches = []
    for batch in loader:
        batches.append(batch)
        if loader.epoch == 1:
            break
    assert loader.state_dict()["window"] == 0 and loader.state_dict()["index"] == 0
    chunks = source_chunks(ds)
    assert len(chunks) == sum(-(-n // SEQ_LEN) for n in ds.lengths) > ds.num_documents   # distinct; some split
    assert pieces(batches) == Counter(chunks.keys())
    padding = sum(e - a for b in batches for tok, ids in zip(b["tokens"].numpy(), b["doc_ids"].numpy())
                  for a, e in runs(ids) if tok[a] == EOD)
    assert padding == len(batches) * SEQ_LEN - ds.num_tokens


def test_batch_conventions(byte_dataset):
    ds = TokenDataset(byte_dataset)
    chunks = source_chunks(ds)
    for b in take(make(byte_dataset, batch_size=4, seed=1), 12):
        assert {k: (tuple(v.shape), v.dtype) for k, v in b.items()} == {
            "tokens": ((4, SEQ_LEN), torch.int64), "labels": ((4, SEQ_LEN), torch.int64),
            "position_ids": ((4, SEQ_LEN), torch.int64), "doc_ids": ((4, SEQ_LEN), torch.int32)}
        # Labels are -100 exactly on end-of-document tokens and padding (which is the same id).
        assert torch.equal(b["labels"] == -100, b["tokens"] == EOD)
        for tok, lab, pos, ids in zip(*(b[k].numpy() for k in ("tokens", "labels", "position_ids", "doc_ids"))):
            spans = runs(ids)
            assert ids[[a for a, _ in spans]].tolist() == list(range(len(spans)))
            for a, e in spans:
                assert pos[a:e].tolist() == list(range(e - a))
                if tok[a] == EOD:   # padding: the last run
                    assert e == SEQ_LEN
                    continue
                # Inside a piece the label is the next token; at its end, the document's next token or -100.
                assert (lab[a:e - 1] == tok[a + 1:e]).all() and lab[e - 1] == chunks[tuple(tok[a:e])]
        # The document ids make a valid bbm mask whose allowed pairs are those of causal documents.
        mask = bbm.Mask.from_documents(b["doc_ids"])
        want = sum((e - a) * (e - a + 1) // 2 for row in b["doc_ids"].numpy() for a, e in runs(row))
        assert int(mask.allowed_pairs()) == want


def test_deterministic_per_seed(byte_dataset):
    a, b, c = (take(make(byte_dataset, batch_size=2, seed=s, prefetch=p), 6) for s, p in ((3, 2), (3, 0), (4, 2)))
    assert equal(a, b) and not equal(a, c)


def test_resume_equals_uninterrupted(byte_dataset):
    """Stop after 5 batches (the prefetch thread is ahead), save, restore in a new loader: the next batches
    are the uninterrupted run's, across the epoch boundary, also with another world size."""
    full = take(make(byte_dataset, batch_size=8, seed=5), 14)
    first = make(byte_dataset, batch_size=8, seed=5)
    it = iter(first)
    assert equal([next(it) for _ in range(5)], full[:5])
    time.sleep(0.3)   # the prefetch thread fills its queue meanwhile; the state must not count those batches
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    resumed = make(byte_dataset, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    rest = take(resumed, 9)
    assert equal(rest, full[5:]) and resumed.epoch >= 1
    ranks = [make(byte_dataset, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    halves = [take(r, 9) for r in ranks]
    assert equal([{k: torch.cat([x[k], y[k]]) for k in x} for x, y in zip(*halves)], full[5:])


def test_ranks_are_disjoint_and_complete(byte_dataset):
    """World size 3 x batch 2 reads, step by step, exactly the sequences of world size 1 x batch 6."""
    single = take(make(byte_dataset, batch_size=6, seed=2), 20)
    ranks = [take(make(byte_dataset, batch_size=2, seed=2, rank=r, world_size=3), 20) for r in range(3)]
    joined = [{k: torch.cat([r[i][k] for r in ranks]) for k in single[0]} for i in range(20)]
    assert equal(joined, single)
    assert pieces(single) == pieces(ranks[0]) + pieces(ranks[1]) + pieces(ranks[2])


def test_from_config_and_thread_stops(text_dir, tmp_path):
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path), num_workers=1, prefetch=3,
                     shuffle_buffer=8)
    loader = PackedLoader.from_config(cfg, SEQ_LEN, 2)
    assert (loader.vocab_size, loader.eod_id, loader.pad_id, loader.prefetch) == (257, EOD, EOD, 3)
    it = iter(loader)
    next(it)
    thread = next(t for t in threading.enumerate() if t.name == "bbm-data-prefetch")
    it.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_loader_bad_input(byte_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, world_size=2\), got 2"):
        make(byte_dataset, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len: expected a positive int, got 0"):
        PackedLoader(byte_dataset, 0, 1)
    with pytest.raises(ValueError, match="dataset_dir: expected a prepared dataset directory"):
        make(tmp_path)
    loader = make(byte_dataset)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"state\['seq_len'\]: expected 32 as in this loader, got 64"):
        PackedLoader(byte_dataset, 32, 1, shuffle_buffer=8).load_state_dict(state)
    with pytest.raises(ValueError, match="state: expected a dict with keys"):
        loader.load_state_dict({"epoch": 0})
    loader.load_state_dict(dict(state, window=10 ** 6))
    with pytest.raises(ValueError, match="state: expected a position inside epoch 0 of this dataset"):
        next(iter(loader))
