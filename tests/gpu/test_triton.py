"""The compiled kernels on a CUDA GPU (skipped elsewhere): bf16/fp16 against float64, head dims 32-256,
determinism, the metadata kernels against the CPU build, torch.compile (inductor) without graph breaks,
dispatch of exactly causal masks to SDPA; NaN propagation."""
import pytest
import torch

import bbm
from bbm.attention import fa4, ragged
from bbm.testing import random_doc_ids
from helpers.attention import assert_tiles_match_cpu, check_flash_rule, qkv

CUDA = "cuda"


def triton(mask, scale):
    return lambda q, k, v: bbm.attention(q, k, v, mask, scale=scale, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_documents_gpu(dtype, d):
    mask = bbm.Mask.from_documents(random_doc_ids(2, 1500, 9, generator=torch.Generator().manual_seed(d), device=CUDA))
    check_flash_rule(triton(mask, d ** -0.5), *qkv(2, 4, 2, 1500, 1500, d, dtype, CUDA), mask, d ** -0.5)


@pytest.mark.parametrize("d", [32, 256])
def test_head_dims_gpu(d):
    mask = bbm.Mask.causal(700, 900, window=300, device=CUDA)
    check_flash_rule(triton(mask, d ** -0.5), *qkv(1, 2, 1, 700, 900, d, torch.bfloat16, CUDA), mask, d ** -0.5)


def test_dense_bits_and_empty_rows_gpu():
    allowed = torch.rand(2, 4, 600, 700, device=CUDA) < 0.1
    allowed[..., :256, :256] = True
    allowed[:, :, 300:340] = False
    mask = bbm.Mask.from_dense(allowed)
    out, (dq, _, _) = check_flash_rule(triton(mask, 0.125), *qkv(2, 4, 2, 600, 700, 64, torch.bfloat16, CUDA), mask, 0.125)
    assert (out[:, :, 300:340] == 0).all() and (dq[:, :, 300:340] == 0).all()


def test_deterministic_backward():
    mask = bbm.Mask.from_documents(random_doc_ids(1, 3000, 7, generator=torch.Generator().manual_seed(1), device=CUDA))
    q, k, v = qkv(1, 8, 2, 3000, 3000, 128, torch.bfloat16, CUDA)
    g = torch.randn_like(q)
    runs = [torch.autograd.grad(bbm.attention(q, k, v, mask, backend="triton"), (q, k, v), g) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_metadata_kernels_match_cpu():
    doc = random_doc_ids(2, 20000, 40, generator=torch.Generator().manual_seed(3))
    for window in (None, 700):
        mask = bbm.Mask.from_documents(doc.to(CUDA), window=window)
        assert torch.equal(mask.ranges.cpu(), bbm.Mask.from_documents(doc, window=window).ranges)
        assert_tiles_match_cpu(mask, 128, 128)


def test_inductor_compile_fullgraph():
    """A compiled graph takes the Triton custom op; eager auto takes FA4's or cuDNN's kernels where installed: the
    two agree."""
    short = random_doc_ids(1, 500, 5, generator=torch.Generator().manual_seed(4), device=CUDA)
    mask = bbm.Mask.from_documents(torch.cat([torch.full((1, 2500), 99, device=CUDA, dtype=short.dtype), short], 1))
    q, k, v = qkv(1, 16, 4, 3000, 3000, 128, torch.bfloat16, CUDA)
    eager = "fa4" if fa4.supports(q, mask) else "ragged" if ragged.frontend() else "triton"
    assert bbm.choose_backend(q, mask) == eager
    f = lambda q, k, v: bbm.attention(q, k, v, mask).float().square().sum()
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):  # two kernels' bf16 roundings: compared as a whole (relative norm)
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_causal_dispatches_to_sdpa():
    q, k, v = qkv(1, 4, 4, 1000, 1000, 64, torch.bfloat16, CUDA)
    mask = bbm.Mask.causal(1000, device=CUDA)
    assert bbm.choose_backend(q, mask) == "sdpa"
    a = bbm.attention(q, k, v, mask)
    b = bbm.attention(q, k, v, mask, backend="triton")
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_nan_propagates_gpu():
    """A NaN in one query reaches its row's output and gradient on the Triton and the cuDNN path, as in SDPA."""
    from bbm.attention import fa4, ragged

    q, k, v = qkv(1, 4, 2, 300, 300, 64, torch.bfloat16, CUDA, token_major=True)
    q.data[0, 1, 7, 3] = float("nan")
    mask = bbm.Mask.from_documents(random_doc_ids(1, 300, 4, generator=torch.Generator().manual_seed(9), device=CUDA))
    for backend in ("triton", "ragged") if ragged.frontend() else ("triton",):
        out = bbm.attention(q, k, v, mask, backend=backend)
        assert out[0, 1, 7].isnan().all() and torch.isfinite(out[0, 0]).all(), backend
        (dq,) = torch.autograd.grad(out.float().sum(), (q,))
        assert dq[0, 1, 7].isnan().all(), backend
