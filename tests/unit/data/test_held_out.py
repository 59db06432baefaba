"""Documents held out for evaluation: a fixed choice per document index, never streamed for training."""
import numpy as np
import pytest

from bbm.data import PackedLoader, write_dataset
from bbm.data.loader import held_out

SEQ_LEN = 32


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """300 documents whose tokens are all ``d + 1`` (document d), each ending with the end-of-document id 0."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 3 * SEQ_LEN, size=300)
    tokens = np.concatenate([np.r_[np.full(n - 1, d + 1), 0] for d, n in enumerate(lengths)]).astype(np.uint16)
    return write_dataset(tmp_path_factory.mktemp("ds") / "labelled", tokens, lengths, vocab_size=301, eod_id=0,
                         pad_id=0)


def documents_read(loader, batches: int) -> set:
    it = iter(loader)
    seen = set()
    for _ in range(batches):
        seen |= set(np.unique(next(it)["tokens"].numpy()).tolist())
    return {t - 1 for t in seen if t}


def test_choice_is_fixed_per_document():
    assert np.array_equal(held_out(100, 0.2), held_out(1000, 0.2)[:100])  # a larger dataset keeps the choice
    assert held_out(20000, 0.1).mean() == pytest.approx(0.1, abs=0.01)
    assert not held_out(50, 0.0).any()


def test_eval_documents_never_reach_training(labelled):
    eval_docs = set(np.flatnonzero(held_out(300, 0.2)).tolist())
    assert 30 < len(eval_docs) < 90
    # two epochs of training batches: every training document, and no held-out one
    train = documents_read(PackedLoader(labelled, SEQ_LEN, 4, eval_fraction=0.2, prefetch=0), batches=400)
    assert train == set(range(300)) - eval_docs
    evaluated = documents_read(PackedLoader(labelled, SEQ_LEN, 4, eval_fraction=0.2, split="eval", prefetch=0),
                               batches=100)
    assert evaluated == eval_docs
    # without held-out documents the stream reads them all
    assert documents_read(PackedLoader(labelled, SEQ_LEN, 4, prefetch=0), batches=400) == set(range(300))


def test_split_errors_name_the_setting(labelled):
    with pytest.raises(ValueError, match=r"^data\.eval_fraction: expected a fraction that holds out one of the dataset's 300 "
                                         r"documents at least \(or eval\.every=0"):
        PackedLoader(labelled, SEQ_LEN, 1, eval_fraction=0.0, split="eval")
    with pytest.raises(ValueError, match=r"^split: expected one of \('train', 'eval'\), got 'test'"):
        PackedLoader(labelled, SEQ_LEN, 1, split="test")


def test_resuming_with_another_split_fails(labelled):
    state = PackedLoader(labelled, SEQ_LEN, 1, eval_fraction=0.2).state_dict()
    with pytest.raises(ValueError, match=r"^state\['eval_fraction'\]: expected 0.1 as in this loader, got 0.2"):
        PackedLoader(labelled, SEQ_LEN, 1, eval_fraction=0.1).load_state_dict(state)
    old = {k: v for k, v in PackedLoader(labelled, SEQ_LEN, 1).state_dict().items()
           if k not in ("eval_fraction", "split")}  # saved before documents were held out: it read them all
    PackedLoader(labelled, SEQ_LEN, 1).load_state_dict(old)
    with pytest.raises(ValueError, match=r"^state\['eval_fraction'\]"):
        PackedLoader(labelled, SEQ_LEN, 1, eval_fraction=0.2).load_state_dict(old)
