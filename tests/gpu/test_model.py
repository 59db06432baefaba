"""The decoder's element-wise functions compiled (torch.compile on CUDA) against their plain forms in float64,
outputs and gradients, and a whole model with its compiled regions against the plain one (skipped without a
CUDA GPU)."""
import pytest
import torch

from bbm.attention import fa4, ragged

from bbm.model import Decoder, ModelConfig, build_mask
from bbm.model.decoder import loss_sum
from bbm.model.layers import apply_rope, compiled, rms_norm, rope_tables, silu_gate
from helpers.model import fields, packed_batch

CUDA = "cuda"


def close_with_grads(fn, fused, inputs, tol):
    """fused(*inputs) and the gradients of its float inputs, for a random output gradient, within ``tol`` of the
    largest magnitude of fn's in float64."""
    def leaves(dtype=None):
        return [t.detach().to(dtype or t.dtype).requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
                else t for t in inputs]

    exact, ours = leaves(torch.float64), leaves()
    want, got = fn(*exact), fused(*ours)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad.to(got.dtype))
    pairs = [(got, want)] + [(b.grad, a.grad) for a, b in zip(exact, ours) if torch.is_tensor(a) and a.requires_grad]
    for g, w in pairs:
        assert (g.double() - w).abs().max() <= tol * w.abs().max(), (g, w)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_functions_match_eager_gpu(dtype, tol):
    b, h, n, d, dim = 2, 3, 300, 64, 96
    x = torch.randn(b, n, dim, device=CUDA, dtype=dtype)
    close_with_grads(rms_norm, compiled(rms_norm), [x, torch.rand(dim, device=CUDA, dtype=dtype) + 0.5, 1e-5], tol)
    positions = torch.randint(0, 500, (b, n), device=CUDA)
    cos, sin = rope_tables(positions, d, 10000.0)
    x = torch.randn(b, n, h, d, device=CUDA, dtype=dtype)
    close_with_grads(apply_rope, compiled(apply_rope), [x, cos, sin], tol)
    gate, up = (torch.randn(b, n, 2 * dim, device=CUDA, dtype=dtype) for _ in range(2))
    close_with_grads(silu_gate, compiled(silu_gate), [gate, up], tol)
    labels = torch.randint(0, 77, (b, n), device=CUDA)
    labels[0, :10] = -100
    logits = 3 * torch.randn(b, n, 77, device=CUDA, dtype=dtype)
    close_with_grads(loss_sum, compiled(loss_sum), [logits, labels], tol)


@pytest.mark.parametrize("backend", ["bbm", "flex", "sdpa_masked"])
def test_fused_model_matches_eager_gpu(backend):
    tokens, labels, pos, doc = (t.to(CUDA) for t in fields(packed_batch(2, 256, 61, 5, 3)))
    losses, grads = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=61, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2, fused=fused)
        m = Decoder(cfg).to(CUDA, torch.bfloat16)
        loss = m(tokens, pos, build_mask(doc, backend), labels)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    assert (grads[1] - grads[0]).norm() <= 0.05 * grads[0].norm()


@pytest.mark.skipif(ragged.frontend() is None, reason="cudnn-frontend is not installed")
def test_model_feeds_ragged_attention_without_copies_gpu(monkeypatch):
    """With the compiled blocks, the decoder's q, k and v reach cuDNN's ragged path in (B, N, H, D) memory, and its
    output goes back to the output projection without a copy."""
    seen = []

    def recording(q, k, v, docs, scale, real=ragged.ragged_attention):
        seen.append([ragged.token_major(t) for t in (q, k, v)])
        return real(q, k, v, docs, scale)

    monkeypatch.setattr(ragged, "ragged_attention", recording)
    monkeypatch.setattr(fa4, "supports", lambda q, mask: False)  # auto's path where FA4 is not installed
    tokens, labels, pos, doc = (t.to(CUDA) for t in fields(packed_batch(2, 256, 61, 5, 2)))
    cfg = ModelConfig(vocab_size=61, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    m = Decoder(cfg).to(CUDA, torch.bfloat16)
    m(tokens, pos, build_mask(doc, "bbm"), labels).backward()
    assert seen == [[True, True, True]] * 2


@pytest.mark.skipif(not fa4.installed(), reason="flash_attn.cute (FlashAttention-4) is not installed")
def test_model_feeds_fa4_without_copies_gpu():
    """The decoder's q, k and v reach FlashAttention-4's path in (B, N, H, D) memory: what it hands FA4 are views."""
    seen = []

    def recording(q, k, v, mask, scale, real=fa4.fa4_attention):
        seen.append([ragged.token_major(t) for t in (q, k, v)])
        return real(q, k, v, mask, scale)

    tokens, labels, pos, doc = (t.to(CUDA) for t in fields(packed_batch(2, 256, 61, 5, 2)))
    cfg = ModelConfig(vocab_size=61, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    m = Decoder(cfg).to(CUDA, torch.bfloat16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fa4, "fa4_attention", recording)
        m(tokens, pos, build_mask(doc, "bbm"), labels).backward()
    assert seen == [[True, True, True]] * 2
