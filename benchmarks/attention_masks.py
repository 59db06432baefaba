"""Benchmark masks: each as a bbm.Mask plus the FlexAttention mask_mod a user would write for it."""
from functools import lru_cache

import torch

import bbm
from common import packed_doc_ids, stdlib_file_sizes

stdlib_file_sizes = lru_cache(stdlib_file_sizes)

TREE_NODES = 1024
MASKS = ("docs", "docs4", "causal", "window", "window4k", "docs_window", "prefix", "tree", "scatter", "scatter_rcm")
WINDOWS = {"window": 1024, "window4k": 4096, "docs_window": 1024}


def _tree_parents(nodes: int, seed: int = 0) -> torch.Tensor:
    """A random speculative-decoding tree: each node hangs under one of the previous 8 nodes or the root."""
    g = torch.Generator().manual_seed(seed)
    back = torch.randint(1, 9, (nodes,), generator=g)
    parents = torch.arange(nodes) - back
    return torch.where(parents < 0, -1, parents)


def _scattered(n: int, device, seed: int = 0) -> torch.Tensor:
    """A banded mask (|i - j| < 64) under a hidden random token permutation: scattered, but RCM can
    recover the band."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    pos = torch.arange(n, device=device)
    inv = torch.empty_like(perm)
    inv[perm] = pos
    return ((inv[:, None] - inv[None, :]).abs() < 64).unsqueeze(0).unsqueeze(0)


def document_ids(name: str, n: int, device) -> torch.Tensor:
    """(n,) document ids of the packed row of the "docs" and "docs_window" (byte lengths) or the "docs4" and "prefix"
    (lengths / 4, a subword-token proxy) masks."""
    sizes = stdlib_file_sizes()
    lengths = sizes if name in ("docs", "docs_window") else [max(1, s // 4) for s in sizes]
    return packed_doc_ids(n, lengths, device=device)[0]


def build(name: str, n: int, device):
    """-> (make_mask: () -> bbm.Mask, mask_mod, n_q, n_k). make_mask is what the metadata timing runs."""
    if name in ("docs", "docs4", "prefix"):
        doc = document_ids(name, n, device)
        if name == "prefix":  # each document's first half is its bidirectional prefix
            ids = doc.long()
            pos = torch.arange(n, device=device)
            first = torch.full((int(doc.max()) + 1,), n, device=device).scatter_reduce(0, ids, pos, "amin")
            prefix_end = first[ids] + torch.bincount(ids)[ids] // 2
            prefix = pos < prefix_end

            def mask_mod(b, h, q, kv):
                return (doc[q] == doc[kv]) & ((kv <= q) | (kv < prefix_end[q]))

            return (lambda: bbm.Mask.from_documents(doc[None], prefix=prefix[None], check=False)), mask_mod, n, n

        def mask_mod(b, h, q, kv):
            return (doc[q] == doc[kv]) & (q >= kv)

        return (lambda: bbm.Mask.from_documents(doc[None], check=False)), mask_mod, n, n
    if name == "docs_window":
        doc, w = document_ids(name, n, device), WINDOWS[name]

        def mask_mod(b, h, q, kv):
            return (doc[q] == doc[kv]) & (q >= kv) & (q - kv < w)

        return (lambda: bbm.Mask.from_documents(doc[None], window=w, check=False)), mask_mod, n, n
    if name == "causal":
        return (lambda: bbm.Mask.causal(n, device=device)), (lambda b, h, q, kv: q >= kv), n, n
    if name in ("window", "window4k"):
        w = WINDOWS[name]
        return (lambda: bbm.Mask.causal(n, window=w, device=device)), (lambda b, h, q, kv: (q >= kv) & (q - kv < w)), n, n
    if name == "tree":
        allowed = bbm.Mask.tree(_tree_parents(TREE_NODES).to(device), n - TREE_NODES).dense[0, 0]
        return (lambda: bbm.Mask.from_dense(allowed[None, None])), (lambda b, h, q, kv: allowed[q, kv]), TREE_NODES, n
    if name in ("scatter", "scatter_rcm"):
        allowed = _scattered(n, device)
        reorder = "rcm" if name == "scatter_rcm" else None
        return (lambda: bbm.Mask.from_dense(allowed, reorder=reorder)), (lambda b, h, q, kv: allowed[0, 0, q, kv]), n, n
    raise ValueError(f"mask: expected one of {MASKS}, got {name!r}")
