"""The compiled kernels on a CUDA GPU (skipped elsewhere): bf16/fp16 against float64, head dims 32-256,
determinism, the metadata kernels against the CPU build, torch.compile (inductor) without graph breaks,
dispatch of exactly causal masks to SDPA."""
import pytest
import torch

import bbm
from bbm.attention import ragged
from bbm.testing import random_doc_ids
from gpu import needs_gpu
from kernel_checks import check_against_dense, qkv

pytestmark = needs_gpu
CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_documents_gpu(dtype, d):
    mask = bbm.Mask.from_documents(random_doc_ids(2, 1500, 9, generator=torch.Generator().manual_seed(d), device=CUDA))
    check_against_dense(*qkv(2, 4, 2, 1500, 1500, d, dtype, CUDA), mask, scale=d ** -0.5)


@pytest.mark.parametrize("d", [32, 256])
def test_head_dims_gpu(d):
    check_against_dense(*qkv(1, 2, 1, 700, 900, d, torch.bfloat16, CUDA), bbm.Mask.causal(700, 900, window=300, device=CUDA),
                        scale=d ** -0.5)


def test_dense_bits_and_empty_rows_gpu():
    allowed = torch.rand(2, 4, 600, 700, device=CUDA) < 0.1
    allowed[..., :256, :256] = True
    allowed[:, :, 300:340] = False
    out, (dq, _, _) = check_against_dense(*qkv(2, 4, 2, 600, 700, 64, torch.bfloat16, CUDA), bbm.Mask.from_dense(allowed),
                                          scale=0.125)
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
        cpu = bbm.Mask.from_documents(doc, window=window).tile_meta(128, 128)
        gpu = bbm.Mask.from_documents(doc.to(CUDA), window=window).tile_meta(128, 128)
        for name in ("classes", "q_count_full", "q_count", "q_idx", "k_count_full", "k_count", "k_idx", "q_order", "k_order"):
            assert torch.equal(getattr(cpu, name).to(torch.int32), getattr(gpu, name).cpu().to(torch.int32)), name


def test_inductor_compile_fullgraph():
    """A compiled graph takes the Triton custom op; eager auto takes cuDNN's ragged path (with cudnn-frontend):
    the two agree."""
    short = random_doc_ids(1, 500, 5, generator=torch.Generator().manual_seed(4), device=CUDA)
    mask = bbm.Mask.from_documents(torch.cat([torch.full((1, 2500), 99, device=CUDA, dtype=short.dtype), short], 1))
    q, k, v = qkv(1, 16, 4, 3000, 3000, 128, torch.bfloat16, CUDA)
    assert bbm.choose_backend(q, mask) == ("ragged" if ragged.frontend() else "triton")
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
