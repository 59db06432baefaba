"""The Triton build of the mask metadata (the CUDA path, here in Triton's interpreter) equals the PyTorch build: causal
document ranges in one launch, across chunk boundaries, one-token documents and windows; the tile lists."""
import pytest
import torch

import bbm
from bbm.masks.tiles_gpu import document_ranges
from bbm.testing import random_doc_ids
from helpers.attention import assert_tiles_match_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter


@pytest.mark.parametrize("n,window", [(1, None), (7, 3), (300, None), (4096, 1), (5000, 17)])
def test_document_ranges_kernel_equals_torch(n, window):
    g = torch.Generator().manual_seed(n)
    doc = random_doc_ids(3, n, 9, generator=g)
    doc[1, : min(n, 40)] = 1000 + torch.arange(min(n, 40))  # one-token documents
    want = bbm.Mask.from_documents(doc, window=window).ranges  # the PyTorch build (CPU tensors)
    assert torch.equal(document_ranges(doc.to(DEVICE), window).cpu(), want)


@pytest.mark.parametrize("tm,tn", [(16, 16), (32, 64), (64, 32)])
def test_tile_lists_kernels_equal_torch(tm, tn):
    g = torch.Generator().manual_seed(tm * tn)
    masks = [bbm.Mask.from_documents(random_doc_ids(2, 203, 9, generator=g)),
             bbm.Mask.from_documents(random_doc_ids(1, 150, 4, generator=g), window=13),
             bbm.Mask.causal(100, 170), bbm.Mask.global_tokens(140, 5, 12), bbm.Mask.prefix_lm(150, 45),
             bbm.Mask.from_documents(random_doc_ids(2, 1100, 30, generator=g))]  # > 64 tiles to rank: several programs
    for mask in masks:
        assert_tiles_match_cpu(mask, tm, tn)
