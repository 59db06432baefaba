"""Document masks split by document (bbm.split): the plan partitions the mask exactly, and the assembly of
blocks and the Triton residual (interpreter) matches a float64 dense reference, outputs and gradients.
The blocks run on a float64 engine here; cuDNN's runs in test_gpu.py."""
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm import split
from bbm.testing import dense_attention, random_doc_ids
from kernel_checks import check_against_dense, qkv


class Float64Blocks:
    """One document as causal attention in float64, the engine interface of ``split.CudnnBlocks``; it
    records the block lengths it was given."""
    lengths = []

    @staticmethod
    def _attend(q, k, v, scale):
        n = q.shape[2]
        return dense_attention(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), scale).to(q.dtype)

    @staticmethod
    def forward(q, k, v, scale):
        Float64Blocks.lengths.append(q.shape[2])
        return Float64Blocks._attend(q, k, v, scale), (torch.randn(1),)  # a state passes through

    @staticmethod
    def backward(do, q, k, v, out, state, scale):
        assert state[0].shape == (1,)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            return torch.autograd.grad(Float64Blocks._attend(*leaves, scale), leaves, do)


def block_dense(s: split.Split, rows: int, n: int) -> torch.Tensor:
    """bool (rows, 1, n, n): the pairs the blocks cover."""
    covered = torch.zeros(rows, 1, n, n, dtype=torch.bool)
    for sample, start, length in s.blocks:
        tile = torch.ones(length, length, dtype=torch.bool).tril()
        covered[slice(None) if sample is None else sample, :, start:start + length, start:start + length] = tile
    return covered


def test_plan_partitions_the_mask():
    doc = random_doc_ids(3, 200, 12, generator=torch.Generator().manual_seed(5))
    doc[1, 100:] = 99  # one long document
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=20)
    lengths = torch.unique_consecutive(doc[1], return_counts=True)[1]
    assert [b[2] for b in s.blocks] == sorted([b[2] for b in s.blocks], reverse=True)
    assert all(length >= 20 for _, _, length in s.blocks) and (1, 100, 100) in s.blocks
    assert sum(length for sample, _, length in s.blocks if sample == 1) == int(lengths[lengths >= 20].sum())
    covered, rest = block_dense(s, 3, 200), s.residual.to_dense()
    assert not (covered & rest).any()
    assert torch.equal(covered | rest, mask.to_dense())
    everything = split.plan(mask, min_block=1)
    assert everything.residual is None and torch.equal(block_dense(everything, 3, 200), mask.to_dense())
    assert split.plan(mask, min_block=201) is None


def test_plan_of_a_shared_mask_and_of_other_masks():
    doc = torch.tensor([[0] * 30 + [1] * 5 + [2] * 25])
    s = split.plan(bbm.Mask.from_documents(doc), min_block=20)
    assert s.blocks == ((None, 0, 30), (None, 35, 25))
    assert s.busy_tiles(16) == 2 and s.busy_tiles(64) == 1  # tiles 16-31 and 32-47 hold tokens 30-34
    for mask in (bbm.Mask.from_documents(doc, window=8), bbm.Mask.from_documents(doc, causal=False),
                 bbm.Mask.prefix_lm(60, 10), bbm.Mask.causal(60),
                 bbm.Mask.from_dense(torch.ones(1, 1, 60, 60, dtype=torch.bool))):
        assert split.plan(mask, min_block=1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_per_sample_gqa(dtype):
    """B=2, different documents per sample, GQA 4:2, N=75; some documents blocks, the rest Triton."""
    doc = random_doc_ids(2, 75, 6, generator=torch.Generator().manual_seed(2))
    doc[0, 40:] = 50
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=12)
    assert s.residual is not None and len(s.blocks) >= 2
    check_against_dense(*qkv(2, 4, 2, 75, 75, 32, dtype), mask,
                        run=lambda q, k, v: split.split_attention(q, k, v, s, 0.3, Float64Blocks))


def test_split_shared_mask_one_token_docs():
    """A mask of batch 1 over B=2, one-token documents in the residual, head dim 40."""
    doc = torch.tensor([[0, 1, 2] + [3] * 33 + list(range(4, 14)) + [14] * 20])
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=16)
    assert s.busy_tiles(32) == 2  # the residual launches skip the last tile (interpreter tiles: 32)
    check_against_dense(*qkv(2, 2, 1, doc.shape[1], doc.shape[1], 40, torch.float32), mask,
                        run=lambda q, k, v: split.split_attention(q, k, v, s, 0.3, Float64Blocks))


def test_split_without_residual():
    doc = torch.tensor([[0] * 17 + [1] * 30 + [2] * 3])
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=1)
    assert s.residual is None
    check_against_dense(*qkv(1, 2, 2, 50, 50, 16, torch.float32), mask,
                        run=lambda q, k, v: split.split_attention(q, k, v, s, 0.3, Float64Blocks))


def test_buckets():
    assert [split.bucket(n) for n in (1, 64, 65, 1000, 1024, 1025, 2049, 5000)] == [64, 64, 128, 1024, 1024, 1088, 2176, 5120]
    for n in range(1, 20000, 7):
        assert n <= split.bucket(n) <= (n * 1.0625 if n >= 1024 else n + 63) and split.bucket(n) % 64 == 0


def test_bucket_sizes():
    sizes = split.bucket_sizes(2897, 32768)
    assert sizes == sorted(set(sizes)) and sizes[0] == 2944 and sizes[-1] == 32768 and len(sizes) == 58
    assert set(map(split.bucket, range(2897, 32769))) == set(sizes)
    assert split.bucket_sizes(1, 1) == [64]


def test_split_runs_blocks_at_bucket_lengths():
    """Blocks extended into the next documents (views of q, k, v) and, at the sequence's end, zero-padded in a
    buffer of the same strides; no block runs longer than the sequence."""
    doc = torch.tensor([[0] * 25 + [1] * 3 + [2] * 40 + [3] * 2 + [4] * 80])
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=20)
    assert s.blocks == ((None, 70, 80), (None, 28, 40), (None, 0, 25))
    split._warm.clear()
    Float64Blocks.lengths = []
    check_against_dense(*qkv(1, 2, 1, 150, 150, 16, torch.float32), mask,
                        run=lambda q, k, v: split.split_attention(q, k, v, s, 0.3, Float64Blocks))
    # the first call warms every size a block of 20-150 tokens can take (192 -> 150), then runs the blocks
    assert Float64Blocks.lengths == [64, 128, 150, 128, 64, 64]
    Float64Blocks.lengths = []
    split.split_attention(*qkv(1, 2, 1, 150, 150, 16, torch.float32), s, 0.3, Float64Blocks)
    assert Float64Blocks.lengths == [128, 64, 64]


def test_split_under_activation_checkpointing():
    """A checkpoint counts the tensors the forward saves and recomputes it in the backward; the warm-up runs in
    the first forward only, so its own saves must not count. Gradients equal those without the checkpoint."""
    doc = torch.tensor([[0] * 40 + [1] * 50 + [2] * 6])
    s = split.plan(bbm.Mask.from_documents(doc), min_block=30)
    assert s.residual is not None and len(s.blocks) == 2
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 1, 96, 96, 16, torch.float32))
    grad = torch.randn(1, 2, 96, 16, dtype=torch.float64)
    run = lambda q, k, v: split.split_attention(q, k, v, s, 0.25, Float64Blocks)
    split._warm.clear()
    got = torch.autograd.grad(checkpoint(run, q, k, v, use_reentrant=False), (q, k, v), grad)
    want = torch.autograd.grad(run(q, k, v), (q, k, v), grad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_warm_up_on_another_thread_runs_the_forwards():
    """cuDNN keeps graphs per thread: a thread that recomputes the forward (activation checkpointing, on the
    autograd engine's thread) gets the forward graphs; the backward's were built where autograd runs them."""
    calls = []

    class Counting(Float64Blocks):
        @staticmethod
        def forward(q, k, v, scale):
            calls.append(("fwd", threading.get_ident(), q.shape[2]))
            return Float64Blocks.forward(q, k, v, scale)

        @staticmethod
        def backward(*args):
            calls.append(("bwd", threading.get_ident(), args[1].shape[2]))
            return Float64Blocks.backward(*args)

    s = split.plan(bbm.Mask.from_documents(torch.tensor([[0] * 25 + [1] * 125])), min_block=20)
    q, k, v = qkv(1, 2, 1, 150, 150, 16, torch.float32)
    split._warm.clear()
    split.warm_up(q, k, v, s, 0.3, Counting)
    me = threading.get_ident()
    assert calls == [(kind, me, size) for size in (64, 128, 150) for kind in ("fwd", "bwd")]
    calls.clear()
    other = threading.Thread(target=split.warm_up, args=(q, k, v, s, 0.3, Counting))
    other.start()
    other.join()
    assert calls == [("fwd", other.ident, size) for size in (64, 128, 150)]
    calls.clear()
    split.warm_up(q, k, v, s, 0.3, Counting)
    assert calls == []


def test_block_sizes_stop_at_the_sequence():
    assert split.block_sizes(20, 150) == [64, 128, 150] and split.block_size(80, 150) == 128
    assert split.block_sizes(2897, 32768) == split.bucket_sizes(2897, 32768)
    assert split.block_size(1000, 1000) == 1000 and split.block_sizes(1, 1) == [1]


def test_split_of_a_strided_view():
    """q, k, v that are neither (B, H, N, D) nor (B, N, H, D) dense run through a contiguous copy."""
    doc = torch.tensor([[0] * 40 + [1] * 9 + [2] * 21])
    mask = bbm.Mask.from_documents(doc)
    s = split.plan(mask, min_block=20)

    def strided(q, k, v):
        wide = [torch.cat([t, torch.zeros_like(t)], -1)[..., :t.shape[-1]] for t in (q, k, v)]
        assert not any(t.is_contiguous() or t.transpose(1, 2).is_contiguous() for t in wide)
        return split.split_attention(*wide, s, 0.3, Float64Blocks)
    check_against_dense(*qkv(1, 2, 1, 70, 70, 16, torch.float32), mask, run=strided)
