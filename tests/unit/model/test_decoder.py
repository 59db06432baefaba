"""The decoder and its attention backends, against float64 references on random data."""
import warnings

import pytest
import torch

from bbm.model import ATTENTION_BACKENDS, Decoder, ModelConfig, build_mask
from bbm.train.flops import attention_gain, step_flops
from helpers.model import fields, packed_batch

N, B, VOCAB = 128, 2, 61


def model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    cfg.update(kw)
    return Decoder(ModelConfig(**cfg)).to(dtype)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": None, "tie_embeddings": False}, {"n_kv_heads": 1}])
def test_backends_give_the_same_loss(kw):
    m = model(**kw)
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 1))
    with torch.no_grad():  # FlexAttention has no CPU backward; its eager forward is exact
        losses = {be: m(tokens, pos, build_mask(doc, be), labels).item() for be in ("bbm", "flex", "sdpa_masked")}
    assert losses["flex"] == pytest.approx(losses["bbm"], rel=1e-10)
    assert losses["sdpa_masked"] == pytest.approx(losses["bbm"], rel=1e-10)


def test_bbm_gradients_match_sdpa_masked():
    m = model(seed=3)
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 2))
    grads = {}
    for be in ("bbm", "sdpa_masked"):
        m.zero_grad()
        m(tokens, pos, build_mask(doc, be), labels).backward()
        grads[be] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["bbm"], grads["sdpa_masked"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_packed_equals_documents_run_alone():
    """Per-document positions + the document mask: a packed row gives every document the logits it gets alone."""
    m = model(seed=4)
    tokens, labels, pos, doc = fields(packed_batch(1, N, VOCAB, 5, 5))
    with torch.no_grad():
        packed = m.logits(tokens, pos, build_mask(doc, "bbm"))[0]
        for d in doc[0].unique():
            cols = (doc[0] == d).nonzero().flatten()
            sl = slice(int(cols[0]), int(cols[-1]) + 1)
            n = cols.numel()
            alone = m.logits(tokens[:, sl], torch.arange(n)[None], build_mask(torch.zeros(1, n, dtype=torch.int32), "bbm"))
            torch.testing.assert_close(packed[sl], alone[0], rtol=1e-10, atol=1e-10)


def test_sdpa_causal_attends_across_documents_and_warns_once():
    import bbm.model.backends as backends

    backends._warned_causal = False
    m = model(seed=5)
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        causal = [build_mask(doc, "sdpa_causal") for _ in range(3)]
    assert sum("across documents" in str(w.message) for w in caught) == 1
    with torch.no_grad():
        assert m(tokens, pos, causal[0], labels).item() != pytest.approx(m(tokens, pos, build_mask(doc, "bbm"), labels).item())
    assert causal[0].allowed_pairs() == B * N * (N + 1) // 2


def test_allowed_pairs_and_flops():
    """The count the trainer logs (from the host's document spans, no device sync) equals the mask's pairs."""
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 7))
    for backend in ("bbm", "sdpa_masked", "sdpa_causal"):
        mask = build_mask(doc, backend)
        layer = mask.layer(0)
        assert mask.allowed_pairs() == int(layer.mask.to_dense().sum()) * (B // layer.mask.batch), backend
    lengths = torch.unique_consecutive(doc[0], return_counts=True)[1]
    assert int(build_mask(doc[:1], "sdpa_masked").allowed_pairs()) == int((lengths * (lengths + 1) // 2).sum())
    one_token_and_whole_row = torch.tensor([[5, 5, 2, 2, 2, 7], [1, 1, 1, 1, 1, 1]])
    assert build_mask(one_token_and_whole_row, "bbm").allowed_pairs() == 3 + 6 + 1 + 21
    assert step_flops(10, 100, 2, 4, 8, 1000) == 6 * 10 * 100 + 12 * 2 * 4 * 8 * 1000


def test_gain_timing_runs():
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 8))
    gain = attention_gain(build_mask(doc, "sdpa_masked").layer(0), 4, 2, 16, torch.float32, torch.device("cpu"), repeats=1)
    assert gain["attention_ms"] > 0 and gain["dense_causal_ms"] > 0
    assert gain["gain_vs_dense"] == pytest.approx(gain["dense_causal_ms"] / gain["attention_ms"])


def test_activation_checkpointing_same_gradients():
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 9))
    grads = []
    for ckpt in (False, True):
        m = model(seed=6)
        m.checkpoint_layers = ckpt
        m(tokens, pos, build_mask(doc, "bbm"), labels).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw, key", [({"n_heads": 5}, "model.n_heads"), ({"n_kv_heads": 3}, "model.n_kv_heads"),
                                     ({"attention": "dense"}, "model.attention"), ({"vocab_size": None}, "model.vocab_size"),
                                     ({"dim": 36, "n_heads": 12}, "model.n_heads")])
def test_bad_model_config(kw, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        model(**kw)


def test_build_mask_checks():
    with pytest.raises(ValueError, match="backend"):
        build_mask(torch.zeros(1, 8, dtype=torch.int32), "dense")
    with pytest.raises(TypeError, match="doc_ids"):
        build_mask(torch.zeros(1, 8), "bbm")
    assert set(ATTENTION_BACKENDS) == {"bbm", "flex", "sdpa_masked", "sdpa_causal"}


def test_bbm_backend_reaches_bbm_attention():
    m = model()
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 4))
    with torch.no_grad():
        exact = m(tokens, pos, build_mask(doc, "bbm"), labels)
        assert m(tokens, pos, build_mask(doc, "bbm", "reference"), labels) == exact  # what auto runs on CPU
        with pytest.raises(ValueError, match="^backend: expected 'ragged' where cuDNN's ragged attention runs"):
            m(tokens, pos, build_mask(doc, "bbm", "ragged"), labels)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_local_and_global_layers_with_prefixes_agree_across_backends():
    """Per-layer windows (a local layer between global ones) and per-document prefixes: each backend runs the same
    masks; prefix tokens whose next token they can see get no label."""
    m = model(n_layers=3, windows=[5, None], prefix_fraction=0.5)
    assert m.cfg.layer_windows() == (5, None, 5)
    tokens, labels, pos, doc = fields(packed_batch(B, N, VOCAB, 5, 11))
    masks = {be: build_mask(doc, be, layer_windows=m.cfg.layer_windows(), prefix_fraction=0.5)
             for be in ("bbm", "flex", "sdpa_masked")}
    bbm_mask = masks["bbm"]
    assert bbm_mask.layer(0).mask.window == 5 and bbm_mask.layer(1).mask.window is None
    assert bbm_mask.layer(2) is bbm_mask.layer(0)
    hidden = bbm_mask.hide_prefix_labels(labels)
    prefix = bbm_mask.prefix
    assert ((hidden == -100) >= (labels == -100)).all() and (hidden[:, :-1][prefix[:, :-1] & prefix[:, 1:]] == -100).all()
    with torch.no_grad():  # FlexAttention has no CPU backward; its eager forward is exact
        losses = {be: m(tokens, pos, mask, hidden).item() for be, mask in masks.items()}
    assert losses["flex"] == pytest.approx(losses["bbm"], rel=1e-10)
    assert losses["sdpa_masked"] == pytest.approx(losses["bbm"], rel=1e-10)
    dense = [bbm_mask.layer(i).mask.to_dense().sum() for i in range(3)]
    assert bbm_mask.allowed_pairs() == pytest.approx(float(sum(dense)) / 3 * (B // bbm_mask.layer(0).mask.batch))


@pytest.mark.parametrize("key, value", [("windows", [0]), ("windows", [2.5]), ("prefix_fraction", 1.0),
                                        ("prefix_fraction", -0.1)])
def test_windows_and_prefix_fraction_are_checked(key, value):
    with pytest.raises((ValueError, TypeError), match=f"^model.{key}"):
        ModelConfig(**{key: value}).validate()
