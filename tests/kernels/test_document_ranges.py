"""The one-launch Triton build of causal document ranges (the CUDA path of Mask.from_documents) equals the
PyTorch build, across chunk boundaries, one-token documents and windows."""
import pytest
import torch

import bbm
from bbm.masks.tiles_gpu import document_ranges
from bbm.testing import random_doc_ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter


@pytest.mark.parametrize("n,window", [(1, None), (7, 3), (300, None), (4096, 1), (5000, 17)])
def test_document_ranges_kernel_equals_torch(n, window):
    g = torch.Generator().manual_seed(n)
    doc = random_doc_ids(3, n, 9, generator=g)
    doc[1, : min(n, 40)] = 1000 + torch.arange(min(n, 40))  # one-token documents
    want = bbm.Mask.from_documents(doc, window=window).ranges  # the PyTorch build (CPU tensors)
    assert torch.equal(document_ranges(doc.to(DEVICE), window).cpu(), want)
