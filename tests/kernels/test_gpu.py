"""The compiled kernels on a CUDA GPU (skipped elsewhere): bf16/fp16 against float64, head dims 32-256,
determinism, the metadata kernels against the CPU build, torch.compile (inductor) without graph breaks,
dispatch of exactly causal masks to SDPA, long documents as cuDNN blocks (bbm.split)."""
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
import bbm.split
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
        cpu = bbm.Mask.from_documents(doc, window=window).block_meta(128, 128)
        gpu = bbm.Mask.from_documents(doc.to(CUDA), window=window).block_meta(128, 128)
        for name in ("classes", "q_count_full", "q_count", "q_idx", "k_count_full", "k_count", "k_idx", "q_order", "k_order"):
            assert torch.equal(getattr(cpu, name).to(torch.int32), getattr(gpu, name).cpu().to(torch.int32)), name


def test_inductor_compile_fullgraph():
    """A compiled graph takes the Triton custom op; eager auto takes cuDNN's ragged path (or, without
    cudnn-frontend, the split: a 2500-token document at 16 x 128 is above its threshold): the two agree."""
    short = random_doc_ids(1, 500, 5, generator=torch.Generator().manual_seed(4), device=CUDA)
    mask = bbm.Mask.from_documents(torch.cat([torch.full((1, 2500), 99, device=CUDA, dtype=short.dtype), short], 1))
    q, k, v = qkv(1, 16, 4, 3000, 3000, 128, torch.bfloat16, CUDA)
    assert bbm.choose_backend(q, mask) == ("ragged" if bbm.ragged.frontend() else "split")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,kv_heads,shared", [(128, 4, False), (64, 2, True), (128, 1, False)])
def test_split_documents_gpu(dtype, d, kv_heads, shared):
    """Long documents on cuDNN next to short ones on Triton; per-sample or shared masks; GQA and MQA."""
    doc = random_doc_ids(1 if shared else 2, 4000, 12, generator=torch.Generator().manual_seed(d + kv_heads), device=CUDA)
    doc[:, 700:2500] = -1  # a long document
    doc[-1, 2600:3900] = -2  # and another
    mask = bbm.Mask.from_documents(doc)
    s = bbm.split.plan(mask, 1000)
    assert s.residual is not None and len(s.blocks) >= 2
    check_against_dense(*qkv(2, 4, kv_heads, 4000, 4000, d, dtype, CUDA), mask, scale=d ** -0.5,
                        run=lambda q, k, v: bbm.split.split_attention(q, k, v, s, d ** -0.5))


def test_split_warm_up_runs_backward_on_the_backward_thread_gpu():
    """cuDNN keeps graphs per thread: the warm-up's backward must run where the split's backward runs."""
    threads = {"warm": set(), "real": set()}

    class Recording(bbm.split.CudnnBlocks):  # an engine of its own, so the warm-up runs for it
        phase = "warm"

        @staticmethod
        def backward(*args):
            threads[Recording.phase].add(threading.get_ident())
            return bbm.split.CudnnBlocks.backward(*args)

    doc = torch.zeros(1, 3000, dtype=torch.int32, device=CUDA)
    doc[:, 1200:] = 1
    s = bbm.split.plan(bbm.Mask.from_documents(doc), 1000)
    q, k, v = qkv(1, 4, 2, 3000, 3000, 64, torch.bfloat16, CUDA)
    out = bbm.split.split_attention(q, k, v, s, 0.125, Recording)
    Recording.phase = "real"
    out.backward(torch.randn_like(out))
    assert len(threads["warm"]) == 1 and threads["warm"] == threads["real"], threads


def test_split_under_checkpointing_warms_the_recompute_thread_gpu(monkeypatch):
    """Activation checkpointing recomputes the split's forward on the backward's thread, and cuDNN keeps graphs
    per thread: every thread that runs a block's forward ran the warm-up's forward first."""
    warming, warm, cold = [False], set(), []

    class Recording(bbm.split.CudnnBlocks):
        @staticmethod
        def forward(*args):
            me = threading.get_ident()
            if warming[0]:
                warm.add(me)
            elif me not in warm:
                cold.append(me)
            return bbm.split.CudnnBlocks.forward(*args)

    def watched(*args, real=bbm.split.warm_up):
        warming[0] = True
        try:
            return real(*args)
        finally:
            warming[0] = False

    monkeypatch.setattr(bbm.split, "warm_up", watched)
    doc = torch.zeros(1, 3000, dtype=torch.int32, device=CUDA)
    doc[:, 1200:] = 1
    s = bbm.split.plan(bbm.Mask.from_documents(doc), 1000)
    q, k, v = qkv(1, 4, 2, 3000, 3000, 64, torch.bfloat16, CUDA)
    run = lambda q, k, v: bbm.split.split_attention(q, k, v, s, 0.125, Recording)
    out = checkpoint(run, q, k, v, use_reentrant=False)
    want = torch.autograd.grad(run(q, k, v), (q, k, v), out.detach())
    got = torch.autograd.grad(out, (q, k, v), out.detach())
    assert len(warm) == 2 and not cold, (warm, cold)
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def test_split_needs_inputs_cudnn_takes_gpu():
    """Without cudnn-frontend, auto takes the split where PyTorch's cuDNN attention takes the inputs and the Triton
    kernels elsewhere (fp32, deterministic algorithms: that backward is not bitwise reproducible; cuDNN's ragged
    graphs have a deterministic backward); a forced split refuses such inputs."""
    doc = torch.zeros(1, 6000, dtype=torch.int32, device=CUDA)
    doc[:, 3000:] = 1
    mask = bbm.Mask.from_documents(doc)
    q, k, v = qkv(1, 8, 4, 6000, 6000, 128, torch.bfloat16, CUDA)
    ragged = bbm.ragged.frontend() is not None
    assert bbm.choose_backend(q, mask) == ("ragged" if ragged else "split") and bbm.split.supported(q)
    assert bbm.choose_backend(q.float(), mask) == "triton"
    with pytest.raises(ValueError, match="^q: expected inputs cuDNN attention takes"):
        bbm.attention(q.float(), k.float(), v.float(), mask, backend="split")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not bbm.split.supported(q) and bbm.choose_backend(q, mask) == ("ragged" if ragged else "triton")
        with pytest.raises(ValueError, match="deterministic algorithms off"):
            bbm.attention(q, k, v, mask, backend="split")
    finally:
        torch.use_deterministic_algorithms(False)


def test_split_backend_gpu():
    """backend="split" through bbm.attention: transposed (B, N, H, D) views, GQA, a block at the sequence's end."""
    doc = torch.zeros(1, 5000, dtype=torch.int32, device=CUDA)
    doc[:, 2500:] = 1
    doc[:, 2600:2650] = 2
    doc[:, 2650:] = 3
    mask = bbm.Mask.from_documents(doc)
    make = lambda h: torch.randn(1, 5000, h, 128, device=CUDA, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    q, k, v = make(16), make(4), make(4)
    assert bbm.split.plan_for(q, mask).blocks == ((None, 0, 2500), (None, 2650, 2350))
    g = torch.randn_like(q)
    want = [bbm.attention(q, k, v, mask, backend="triton")]
    want += torch.autograd.grad(want[0], (q, k, v), g)
    got = [bbm.attention(q, k, v, mask, backend="split")]
    got += torch.autograd.grad(got[0], (q, k, v), g)
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


def test_split_without_a_long_document_is_triton_gpu():
    doc = random_doc_ids(1, 1000, 20, generator=torch.Generator().manual_seed(5), device=CUDA)  # all far below 2048
    q, k, v = qkv(1, 4, 2, 1000, 1000, 64, torch.bfloat16, CUDA)
    mask = bbm.Mask.from_documents(doc)
    assert bbm.split.plan_for(q, mask) is None and bbm.prepare(q, mask, backend="split") == "split"
    torch.testing.assert_close(bbm.attention(q, k, v, mask, backend="split"),
                               bbm.attention(q, k, v, mask, backend="triton"), rtol=0, atol=0)


def test_split_needs_a_document_mask_gpu():
    q, k, v = qkv(1, 4, 4, 1000, 1000, 64, torch.bfloat16, CUDA)
    with pytest.raises(ValueError, match="mask: .*Mask.from_documents"):
        bbm.attention(q, k, v, bbm.Mask.causal(1000, window=100, device=CUDA), backend="split")
