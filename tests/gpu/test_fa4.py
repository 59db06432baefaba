"""FlashAttention-4's Hopper kernels driven by bbm's tile lists (bbm.attention.fa4) against a float64 dense reference,
outputs and gradients, by FlashAttention's rule: windows, windowed and prefix-LM documents, global tokens, a causal
mask with Nq != Nk, odd lengths, GQA, head dims 64 and 128, fp16 and bf16, fully masked rows."""
import pytest
import torch

import bbm
from bbm.attention import fa4
from bbm.masks.documents import document_prefix
from bbm.testing import random_doc_ids
from helpers.attention import check_flash_rule, qkv

CUDA = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not fa4.installed()
                                or torch.cuda.get_device_capability()[0] != 9,
                                reason="needs flash_attn.cute (pip install bbm[hopper]) and a Hopper GPU")


def run_fa4(mask, scale):
    return lambda q, k, v: bbm.attention(q, k, v, mask, scale=scale, backend="fa4")


def documents(b, n, count, seed):
    return random_doc_ids(b, n, count, generator=torch.Generator().manual_seed(seed), device=CUDA)


@pytest.mark.parametrize("dtype,d,kv_heads", [(torch.bfloat16, 128, 4), (torch.float16, 64, 2)])
def test_structured_masks_gpu(dtype, d, kv_heads):
    n = 2311  # no multiple of the 128-token tile
    doc = documents(2, n, 12, d + kv_heads)
    masks = [bbm.Mask.sliding_window(n, 300, device=CUDA), bbm.Mask.from_documents(doc, window=200),
             bbm.Mask.from_documents(doc, prefix=document_prefix(doc, 0.4)), bbm.Mask.from_documents(doc),
             bbm.Mask.global_tokens(n, 40, 256, device=CUDA)]
    q, k, v = qkv(2, 16, kv_heads, n, d=d, dtype=dtype, device=CUDA, token_major=True)
    for mask in masks:
        check_flash_rule(run_fa4(mask, d ** -0.5), q, k, v, mask, d ** -0.5)
    assert bbm.choose_backend(q, masks[2]) == "fa4"  # auto's path for prefix-LM documents on a Hopper GPU


def test_causal_with_fewer_queries_and_empty_rows_gpu():
    mask = bbm.Mask.causal(700, 1500, window=300, device=CUDA)
    q, k, v = qkv(1, 16, 4, 700, 1500, 128, torch.bfloat16, CUDA)
    check_flash_rule(run_fa4(mask, 0.1), q, k, v, mask, 0.1)
    lo = torch.zeros(1, 640, dtype=torch.int32, device=CUDA)
    hi = torch.randint(1, 640, (1, 640), device=CUDA, dtype=torch.int32)
    hi[:, 100:180] = 0  # fully masked rows: zero output and gradients
    ranges = bbm.Mask.from_ranges(lo, hi, n_k=640)
    q, k, v = qkv(1, 16, 4, 640, d=128, dtype=torch.bfloat16, device=CUDA)
    check_flash_rule(run_fa4(ranges, 0.125), q, k, v, ranges, 0.125)


@pytest.mark.parametrize("window", [1, 64, 700, 5000])
def test_sliding_windows_on_fa4s_own_kernel_gpu(window):
    n = 3001
    mask = bbm.Mask.causal(n, window=window, device=CUDA)
    q, k, v = qkv(2, 16, 4, n, d=128, dtype=torch.bfloat16, device=CUDA, token_major=True)
    assert isinstance(fa4.plan(mask, 2), fa4.Documents) and fa4.plan(mask, 2).cu_seqlens is None
    check_flash_rule(run_fa4(mask, 128 ** -0.5), q, k, v, mask, 128 ** -0.5)
    assert bbm.choose_backend(q, mask) == "fa4"  # auto's path for plain sliding windows on a Hopper GPU


@pytest.mark.parametrize("dtype,d,kv_heads", [(torch.bfloat16, 128, 16), (torch.float16, 64, 2)])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 150), (False, None), (False, 90)])
def test_documents_as_fa4s_variable_length_sequences_gpu(dtype, d, kv_heads, causal, window):
    n = 1777
    doc = documents(2, n, 9, d + kv_heads + (window or 0))
    doc[:, 100] = doc[:, 99] + 1  # a one-token document
    doc[:, 101:] += 1
    mask = bbm.Mask.from_documents(doc, causal=causal, window=window)
    q, k, v = qkv(2, 16, kv_heads, n, d=d, dtype=dtype, device=CUDA, token_major=True)
    assert fa4.plan(mask, 2).cu_seqlens is not None
    check_flash_rule(run_fa4(mask, d ** -0.5), q, k, v, mask, d ** -0.5)


def test_one_mask_for_every_sample_gpu():
    n = 1000
    mask = bbm.Mask.from_documents(documents(1, n, 6, 7))  # broadcast over the batch of 3
    q, k, v = qkv(3, 8, 8, n, d=128, dtype=torch.bfloat16, device=CUDA)  # (B, H, N, D) memory: copied
    check_flash_rule(run_fa4(mask, 0.09), q, k, v, mask, 0.09)


@pytest.mark.parametrize("dtype,d,kv_heads", [(torch.bfloat16, 128, 4), (torch.float16, 64, 16)])
@pytest.mark.parametrize("fraction,window", [(0.5, None), (0.3, 200), (1.0, None), (0.0, None)])
def test_prefix_lm_documents_as_two_calls_gpu(dtype, d, kv_heads, fraction, window):
    """Prefix-LM documents as two of FA4's variable-length calls: prefixes of every length (none, a whole document,
    all documents whole), with a window on the rest, one-token documents, GQA."""
    n = 2049
    doc = documents(2, n, 11, d + int(10 * fraction))
    doc[:, 50] = doc[:, 49] + 1  # a one-token document
    doc[:, 51:] += 1
    prefix = document_prefix(doc, fraction)
    if fraction == 0.5:
        prefix[1] |= doc[1] == doc[1, -1]  # the last document of the second sample all prefix
    mask = bbm.Mask.from_documents(doc, window=window, prefix=prefix)
    q, k, v = qkv(2, 16, kv_heads, n, d=d, dtype=dtype, device=CUDA, token_major=True)
    assert isinstance(fa4.plan(mask, 2), fa4.Prefixes)
    check_flash_rule(run_fa4(mask, d ** -0.5), q, k, v, mask, d ** -0.5)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize("prefixed", [False, True])
def test_masks_from_host_ids_plan_and_attend_without_a_device_sync_gpu(prefixed):
    """A training micro-batch's mask from the host's ids: its plan and attention (forward and backward, after the first
    call compiled the kernels) never wait for the GPU."""
    doc = random_doc_ids(2, 3001, 30, generator=torch.Generator().manual_seed(11))
    prefix = document_prefix(doc, 0.5) if prefixed else None
    q, k, v = qkv(2, 8, 4, 3001, d=128, dtype=torch.bfloat16, device=CUDA, token_major=True)
    g = torch.randn_like(q)
    bbm.attention(q, k, v, bbm.Mask.from_documents(doc, prefix=prefix, device=CUDA), backend="fa4").backward(g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = bbm.Mask.from_documents(doc, prefix=prefix, check=False, device=CUDA)
        bbm.plan(q, mask, "fa4")
        bbm.attention(q, k, v, mask, backend="fa4").backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_flash_rule(run_fa4(mask, 128 ** -0.5), q, k, v, mask, 128 ** -0.5)
