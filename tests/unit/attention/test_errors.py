"""Bad input gets a clear error naming the argument, the expected and the given value."""
import pytest
import torch

import bbm
from helpers.attention import qkv


@pytest.mark.parametrize("case,exc,words", [
    (lambda: bbm.attention(torch.randn(4, 16, 8), *qkv()[1:]), ValueError, ["q", "4-d", "(4, 16, 8)"]),
    (lambda: bbm.attention(*qkv(hq=3, hkv=2)), ValueError, ["Hq divisible by Hkv", "Hq=3, Hkv=2"]),
    (lambda: bbm.attention(qkv()[0], qkv()[1], qkv(n_k=8)[2]), ValueError, ["v", "(1, 2, 16, 8)", "(1, 2, 8, 8)"]),
    (lambda: bbm.attention(qkv()[0], qkv(d=4)[1], qkv(d=4)[2]), ValueError, ["k", "head dim 8", "4"]),
    (lambda: bbm.attention(qkv()[0], qkv(d=4)[1], qkv()[2]), ValueError, ["k:", "head dim 8", "4"]),
    (lambda: bbm.attention(qkv()[0], *qkv(dtype=torch.float64)[1:]), TypeError, ["k", "torch.float32", "torch.float64"]),
    (lambda: bbm.attention(qkv()[0].long(), *qkv()[1:]), TypeError, ["q", "floating-point", "torch.int64"]),
    (lambda: bbm.attention(qkv()[0], qkv()[1].to("meta"), qkv()[2]), ValueError, ["k", "device cpu", "meta"]),
    (lambda: bbm.attention(*qkv(), bbm.Mask.causal(15)), ValueError, ["mask", "Nq=16, Nk=16", "Nq=15, Nk=15"]),
    (lambda: bbm.attention(*qkv(b=2), bbm.Mask.from_documents(torch.zeros(3, 16, dtype=torch.long))),
     ValueError, ["mask", "batch 1 or 2", "batch 3"]),
    (lambda: bbm.attention(*qkv(), bbm.Mask.from_dense(torch.ones(1, 3, 16, 16, dtype=torch.bool))),
     ValueError, ["mask", "heads 1 or 4", "heads 3"]),
    (lambda: bbm.attention(*qkv(), torch.ones(16, 16, dtype=torch.bool)), TypeError, ["mask", "bbm.Mask", "Tensor"]),
    (lambda: bbm.attention(*qkv(), scale=-1.0), ValueError, ["scale", "positive", "-1.0"]),
    (lambda: bbm.attention(*qkv(), scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
    (lambda: bbm.attention(*qkv(), scale=float("inf")), ValueError, ["scale", "finite", "inf"]),
    (lambda: bbm.attention(*qkv(), backend="cuda"), ValueError, ["backend", "'cuda'"]),
    (lambda: bbm.attention(*qkv(), bbm.Mask.from_documents(torch.zeros(1, 16, dtype=torch.long)), backend="ragged"),
     ValueError, ["backend", "'ragged'", "cpu"]),
    (lambda: bbm.attention(*qkv(), bbm.Mask.causal(16), backend="ragged"), ValueError, ["backend", "'ragged'", "cpu"]),
    (lambda: bbm.Mask.from_dense(torch.ones(1, 1, 4, 4)), TypeError, ["allowed", "torch.bool", "torch.float32"]),
    (lambda: bbm.Mask.from_dense(torch.ones(2, 4, 4, dtype=torch.bool)), ValueError,
     ["allowed", "(Nq, Nk) or (B, H, Nq, Nk)", "(2, 4, 4)"]),
    (lambda: bbm.Mask.from_dense(torch.ones(1, 1, 4, 5, dtype=torch.bool), reorder="rcm"),
     ValueError, ["reorder", "Nq == Nk", "Nq=4, Nk=5"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(8, dtype=torch.long)), ValueError, ["doc_ids", "2-d", "(8,)"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(1, 8)), TypeError, ["doc_ids", "integer", "torch.float32"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(1, 8, dtype=torch.long), window=0), ValueError, ["window", "positive", "0"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(1, 8, dtype=torch.long), window=-3), ValueError, ["window", "-3"]),
    (lambda: bbm.Mask.from_documents(torch.tensor([[0, 0, 1, 1, 0]])), ValueError, ["doc_ids", "contiguous run"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(1, 4, dtype=torch.long), prefix=torch.tensor([[True, False, True, False]])),
     ValueError, ["prefix", "start of each document"]),
    (lambda: bbm.Mask.from_documents(torch.zeros(1, 4, dtype=torch.long), prefix=torch.ones(1, 5, dtype=torch.bool)),
     ValueError, ["prefix", "(1, 4)", "(1, 5)"]),
    (lambda: bbm.Mask.tree(torch.tensor([-1, 0, 5]), 4), ValueError, ["parents", "[-1, i)"]),
    (lambda: bbm.Mask.causal(0), ValueError, ["n_q", "positive", "0"]),
    (lambda: bbm.Mask.prefix_lm(10, 11), ValueError, ["prefix_len", "[0, 10]", "11"]),
    (lambda: bbm.Mask.causal(8).tile_meta(0, 16), ValueError, ["tile_m", "positive", "0"]),
    (lambda: bbm.Mask.from_dense(torch.ones(1, 1, 8, 8, dtype=torch.bool)).tile_meta(16, 16),
     ValueError, ["tile_n", "multiple of 32", "16"]),
    (lambda: bbm.Mask.from_ranges(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), n_k=2**31),
     ValueError, ["n_k", "2**31", str(2**31)]),
])
def test_bad_input_is_named(case, exc, words):
    with pytest.raises(exc) as info:
        case()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_triton_on_cpu_without_the_interpreter_is_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^backend: expected 'triton' on CUDA tensors .*TRITON_INTERPRET=1.*, got 'triton' on cpu"):
        bbm.attention(*qkv(), backend="triton")


def test_ragged_names_why_cudnn_frontend_is_unusable(monkeypatch):
    from bbm.attention import ragged
    monkeypatch.setattr(ragged, "_import_frontend", lambda: (None, "cudnn-frontend installed but it finds no cuDNN"))
    monkeypatch.setattr(ragged, "cudnn_takes", lambda q: True)
    with pytest.raises(ValueError, match="finds no cuDNN"):
        bbm.attention(*qkv(), bbm.Mask.from_documents(torch.zeros(1, 16, dtype=torch.long)), backend="ragged")


def test_a_mask_is_immutable():
    mask = bbm.Mask.causal(8)
    with pytest.raises(AttributeError, match="immutable"):
        mask.ranges = None
