"""`Mask`: what may attend to what. The user states the mask; bbm picks the representation.

Two representations:

* **ranges** (structured masks: documents, causal, windows, prefix-LM, global tokens): per query row
  at most two key intervals, an int32 tensor ``(Bm, 4, Nq)`` of ``lo0, hi0, lo1, hi1``. O(N) memory;
  no N x N tensor is ever built.
* **dense** (arbitrary masks, tree masks): a bool ``(Bm, Hm, Nq, Nk)`` tensor, of which the tile metadata
  keeps the partial tiles only, bit-packed. Optionally reordered with Reverse Cuthill-McKee.
"""
from typing import Optional

import numpy as np
import torch

from bbm._checks import check_positive_int, check_tensor, fail
from bbm.masks.blocks import BlockMeta, dense_meta, ranges_meta, unpack_bits
from bbm.masks.reorder import rcm_permutation

DEFAULT_BLOCK = 64
SPARSE_DENSITY = 0.1  # below this, reorder="auto" tries Reverse Cuthill-McKee


class Mask:
    """A boolean attention mask of logical shape ``(Bm, Hm, Nq, Nk)``; ``Bm`` and ``Hm`` may be 1
    (shared by every sample / head). Build it with one of the constructors, not ``Mask(...)``."""

    def __init__(self, *, n_q: int, n_k: int, ranges=None, dense=None, perm=None, exactly_causal=False,
                 documents=None, documents_causal=True):
        self.n_q, self.n_k = n_q, n_k
        self.ranges = ranges  # int32 (Bm, 4, Nq) or None
        self.dense = dense  # bool (Bm, Hm, Nq, Nk), already reordered when perm is set, or None
        self.perm = perm  # int64 (N,): row/column i of `dense` is token perm[i]; None if not reordered
        self.exactly_causal = exactly_causal  # a plain causal mask, Nq == Nk, no documents or window
        # int (Bm, N) document ids when the mask is exactly "attend within the own document" (causally if
        # documents_causal): block diagonal, so bbm may run each document as a plain attention (bbm.split)
        self.documents, self.documents_causal = documents, documents_causal
        self._host_documents = None  # the ids on the host, when the mask was built from host ids
        self._meta = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ranges(cls, lo0, hi0, lo1=None, hi1=None, *, n_k: int):
        """Key ``j`` is allowed for query ``i`` iff ``lo0[b,i] <= j < hi0[b,i]`` or ``lo1[b,i] <= j < hi1[b,i]``.
        Each bound is an int tensor ``(B, Nq)``; intervals are clipped to ``[0, n_k)``."""
        check_positive_int("n_k", n_k)
        bounds = [lo0, hi0] + ([lo1, hi1] if lo1 is not None or hi1 is not None else [])
        names = ["lo0", "hi0", "lo1", "hi1"]
        for name, t in zip(names, bounds):
            check_tensor(name, t, ndim=2, dtype_kind="int")
            if t.shape != bounds[0].shape:
                fail(name, f"shape {tuple(bounds[0].shape)} like lo0", f"shape {tuple(t.shape)}")
            if t.device != bounds[0].device:
                fail(name, f"device {bounds[0].device} like lo0", t.device)
        if len(bounds) == 2:
            bounds += [torch.zeros_like(lo0), torch.zeros_like(lo0)]
        r = torch.stack([b.to(torch.int32).clamp(0, n_k) for b in bounds], dim=1)
        for j in (0, 2):  # normalise empty intervals to [0, 0) so tile bounds ignore them cleanly
            empty = r[:, j] >= r[:, j + 1]
            r[:, j] = torch.where(empty, 0, r[:, j])
            r[:, j + 1] = torch.where(empty, 0, r[:, j + 1])
        return cls(n_q=r.shape[-1], n_k=n_k, ranges=r.contiguous())

    @classmethod
    def from_dense(cls, allowed, *, reorder: Optional[str] = "auto"):
        """``allowed``: bool ``(B or 1, H or 1, Nq, Nk)``, True = may attend.

        ``reorder="rcm"`` permutes tokens with Reverse Cuthill-McKee so scattered non-zeros gather into
        fewer tiles (needs Nq == Nk). ``"auto"`` (default) tries it on extremely sparse square masks
        (density < 10%) and keeps it only if it touches fewer tiles; ``None`` never reorders.
        ``bbm.attention`` applies and undoes the permutation, so results are unchanged."""
        check_tensor("allowed", allowed, ndim=4, dtype_kind="bool")
        if reorder not in (None, "rcm", "auto"):
            fail("reorder", "None, 'rcm' or 'auto'", repr(reorder))
        n_q, n_k = allowed.shape[-2:]
        if n_q == 0 or n_k == 0:
            fail("allowed", "non-empty query and key dims", f"shape {tuple(allowed.shape)}")
        mask = cls(n_q=n_q, n_k=n_k, dense=allowed.contiguous())
        if reorder is None or (reorder == "auto" and (n_q != n_k or mask.density >= SPARSE_DENSITY)):
            return mask
        if n_q != n_k:
            fail("reorder", "a square mask (Nq == Nk) to reorder", f"Nq={n_q}, Nk={n_k}")
        perm = rcm_permutation(allowed).to(allowed.device)
        permuted = allowed[..., perm, :][..., perm]
        reordered = cls(n_q=n_q, n_k=n_k, dense=permuted.contiguous(), perm=perm)
        if reorder == "auto" and reordered.tiles_touched() >= mask.tiles_touched():
            return mask
        return reordered

    @classmethod
    def from_documents(cls, doc_ids, causal: bool = True, window: Optional[int] = None, prefix=None,
                       *, check: bool = True, device=None):
        """``doc_ids``: int ``(B, N)``; a run of equal consecutive ids is one document. A token attends only
        to tokens of its own document; causally if ``causal``; with ``window``, only to the ``window`` most
        recent positions, itself included (non-causal: positions less than ``window`` away).

        ``prefix``: optional bool ``(B, N)`` marking each document's bidirectional prefix (a run at the
        document's start): prefix tokens see the whole prefix, the rest is causal (prefix-LM).
        ``check`` verifies that every document is one contiguous run (one device sync).

        ``device``: where the mask lives (default: ``doc_ids``' device). Host ids with a GPU ``device`` are
        copied there without waiting, and the mask keeps them: plans that read the document list on the host
        (``bbm.ragged``, ``bbm.split``) then need no device sync."""
        check_tensor("doc_ids", doc_ids, ndim=2, dtype_kind="int")
        check_positive_int("window", window, allow_none=True)
        b, n = doc_ids.shape
        if n == 0 or b == 0:
            fail("doc_ids", "a non-empty (B, N) tensor", f"shape {tuple(doc_ids.shape)}")
        host = None
        if device is not None and torch.device(device) != doc_ids.device:
            host = doc_ids if doc_ids.device.type == "cpu" else None
            doc_ids = to_device(doc_ids, device)
        dev = doc_ids.device
        is_start = document_starts(doc_ids)
        if check:
            runs = is_start.sum(1)
            distinct = 1 + (doc_ids.sort(dim=1).values.diff(dim=1) != 0).sum(1)
            if bool((runs != distinct).any()):
                fail("doc_ids", "each document id to form one contiguous run",
                     "an id that appears in two separate runs")
        documents = doc_ids if window is None and prefix is None else None  # each document one plain block
        if doc_ids.is_cuda and causal and prefix is None:  # the training case: one Triton launch
            from bbm.kernels.meta import document_ranges  # imported lazily: CPU users never load Triton
            mask = cls(n_q=n, n_k=n, ranges=document_ranges(doc_ids, window), documents=documents)
            mask._host_documents = host
            return mask
        pos = torch.arange(n, device=dev, dtype=torch.int32).expand(b, n)
        start = torch.where(is_start, pos, 0).cummax(dim=1).values
        if not causal or prefix is not None:  # document ends: only non-causal and prefix-LM rows need them
            is_end = torch.cat([is_start[:, 1:], torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
            end = torch.where(is_end, pos + 1, n).flip(1).cummin(dim=1).values.flip(1)
        if causal:
            lo, hi = start, pos + 1
            if window is not None:
                lo = torch.maximum(start, pos - window + 1)
        else:
            lo, hi = start, end
            if window is not None:
                lo, hi = torch.maximum(start, pos - window + 1), torch.minimum(end, pos + window)
        if prefix is not None:
            if not causal:
                fail("prefix", "None when causal=False (a non-causal document is all prefix)", "a tensor")
            check_tensor("prefix", prefix, ndim=2, dtype_kind="bool")
            if prefix.shape != doc_ids.shape:
                fail("prefix", f"shape {tuple(doc_ids.shape)} like doc_ids", f"shape {tuple(prefix.shape)}")
            if prefix.device != dev:
                fail("prefix", f"device {dev} like doc_ids", prefix.device)
            if check:
                prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=dev), prefix[:, :-1]], dim=1)
                if bool((prefix & ~is_start & ~prev).any()):
                    fail("prefix", "a run of True at the start of each document", "a prefix token after a non-prefix one")
            csum = torch.cat([torch.zeros(b, 1, dtype=torch.int64, device=dev), prefix.long().cumsum(1)], dim=1)
            plen = (csum.gather(1, end.long()) - csum.gather(1, start.long())).to(torch.int32)
            lo = torch.where(prefix, start, lo)
            hi = torch.where(prefix, start + plen, hi)
        mask = cls.from_ranges(lo, hi, n_k=n)
        mask.documents, mask.documents_causal = documents, causal
        mask._host_documents = host
        return mask

    @classmethod
    def causal(cls, n_q: int, n_k: Optional[int] = None, *, window: Optional[int] = None, device=None):
        """Plain causal mask; with ``Nq != Nk`` the queries are the last ``Nq`` positions (bottom-right)."""
        check_positive_int("n_q", n_q)
        n_k = n_q if n_k is None else check_positive_int("n_k", n_k)
        check_positive_int("window", window, allow_none=True)
        q = torch.arange(n_q, device=device, dtype=torch.int32).unsqueeze(0) + (n_k - n_q)
        lo = torch.zeros_like(q) if window is None else (q - window + 1).clamp(min=0)
        mask = cls.from_ranges(lo, q + 1, n_k=n_k)
        mask.exactly_causal = window is None and n_q == n_k
        return mask

    @classmethod
    def sliding_window(cls, n: int, window: int, *, causal: bool = True, device=None):
        """Each token sees the ``window`` most recent positions (itself included); non-causal: every
        position less than ``window`` away."""
        check_positive_int("n", n)
        check_positive_int("window", window)
        return cls.from_documents(torch.zeros(1, n, dtype=torch.int32, device=device), causal=causal,
                                  window=window, check=False)

    @classmethod
    def prefix_lm(cls, n: int, prefix_len: int, *, device=None):
        """One sequence whose first ``prefix_len`` tokens attend bidirectionally, the rest causally.
        For packed documents use ``from_documents(doc_ids, prefix=...)``."""
        check_positive_int("n", n)
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 <= prefix_len <= n:
            fail("prefix_len", f"an int in [0, {n}]", repr(prefix_len))
        prefix = (torch.arange(n, device=device) < prefix_len).unsqueeze(0)
        return cls.from_documents(torch.zeros(1, n, dtype=torch.int32, device=device), prefix=prefix, check=False)

    @classmethod
    def global_tokens(cls, n: int, num_global: int, window: int, *, device=None):
        """Longformer-style: the first ``num_global`` tokens attend to and are attended by every token;
        the others attend to positions less than ``window`` away."""
        check_positive_int("n", n)
        check_positive_int("window", window)
        if isinstance(num_global, bool) or not isinstance(num_global, int) or not 0 <= num_global <= n:
            fail("num_global", f"an int in [0, {n}]", repr(num_global))
        q = torch.arange(n, device=device, dtype=torch.int32).unsqueeze(0)
        is_global = q < num_global
        lo0 = torch.zeros_like(q)
        hi0 = torch.where(is_global, n, num_global)
        lo1 = torch.where(is_global, 0, (q - window + 1).clamp(min=num_global))
        hi1 = torch.where(is_global, 0, (q + window).clamp(max=n))
        return cls.from_ranges(lo0, hi0, lo1, hi1, n_k=n)

    @classmethod
    def tree(cls, parents, prefix_len: int):
        """Speculative-decoding (MEDUSA) tree mask. ``parents``: int ``(T,)`` or ``(B, T)``; node ``i``'s
        parent is ``parents[i] < i``, or -1 for a child of the prefix. Queries are the ``T`` nodes, keys the
        ``prefix_len`` prefix tokens followed by the nodes (Nq = T, Nk = prefix_len + T). Each node sees
        the prefix, its ancestors and itself."""
        check_tensor("parents", parents, dtype_kind="int")
        if parents.ndim == 1:
            parents = parents.unsqueeze(0)
        if parents.ndim != 2 or parents.shape[1] == 0:
            fail("parents", "a non-empty (T,) or (B, T) tensor", f"shape {tuple(parents.shape)}")
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
            fail("prefix_len", "an int >= 0", repr(prefix_len))
        b, t = parents.shape
        node = torch.arange(t, device=parents.device)
        if bool(((parents < -1) | (parents >= node)).any()):
            fail("parents", "parents[i] in [-1, i) for every node i", parents.tolist())
        # ancestor-or-self by pointer jumping: log2(T) rounds of "my ancestors' ancestors"
        reach = torch.eye(t, dtype=torch.bool, device=parents.device).expand(b, t, t).clone()
        has_parent = parents >= 0
        reach |= torch.nn.functional.one_hot(parents.clamp(min=0).long(), t).bool() & has_parent[..., None]
        for _ in range(max(1, (t - 1).bit_length())):
            reach = reach | (reach.float() @ reach.float()).bool()
        allowed = torch.cat([torch.ones(b, t, prefix_len, dtype=torch.bool, device=parents.device), reach], dim=2)
        return cls.from_dense(allowed.unsqueeze(1))

    # ------------------------------------------------------------------ views
    @property
    def device(self) -> torch.device:
        return (self.ranges if self.ranges is not None else self.dense).device

    @property
    def batch(self) -> int:
        return (self.ranges if self.ranges is not None else self.dense).shape[0]

    @property
    def heads(self) -> int:
        return 1 if self.ranges is not None else self.dense.shape[1]

    @property
    def shape(self):
        return (self.batch, self.heads, self.n_q, self.n_k)

    @property
    def is_structured(self) -> bool:
        return self.ranges is not None

    def to_dense(self) -> torch.Tensor:
        """bool ``(Bm, Hm, Nq, Nk)`` in the user's token order (for debugging and references)."""
        if self.dense is not None:
            if self.perm is None:
                return self.dense
            inv = torch.argsort(self.perm)
            return self.dense[..., inv, :][..., inv]
        k = torch.arange(self.n_k, device=self.device, dtype=torch.int32)
        return _in_ranges(self.ranges, k).unsqueeze(1)

    def allowed_pairs(self) -> int:
        """Exact number of allowed (query, key) pairs, summed over the mask's batch and heads."""
        if self.dense is not None:
            return int(self.dense.sum())
        r = self.ranges.long()
        len0 = (r[:, 1] - r[:, 0]).clamp(min=0)
        len1 = (r[:, 3] - r[:, 2]).clamp(min=0)
        overlap = (torch.minimum(r[:, 1], r[:, 3]) - torch.maximum(r[:, 0], r[:, 2])).clamp(min=0)
        overlap = torch.where((len0 > 0) & (len1 > 0), overlap, 0)
        return int((len0 + len1 - overlap).sum())

    @property
    def density(self) -> float:
        """Exact fraction of allowed pairs."""
        return self.allowed_pairs() / (self.batch * self.heads * self.n_q * self.n_k)

    def block_meta(self, block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK) -> BlockMeta:
        """Tile classification and compacted lists for tiles of ``block_m`` queries x ``block_n`` keys
        (in the reordered token order when reordered). Built once per tile shape and cached."""
        check_positive_int("block_m", block_m)
        check_positive_int("block_n", block_n)
        key = (block_m, block_n)
        if key not in self._meta:
            if self.ranges is not None:
                self._meta[key] = ranges_meta(self.ranges, self.n_k, block_m, block_n)
            else:
                self._meta[key] = dense_meta(self.dense, block_m, block_n)
        return self._meta[key]

    def block_summary(self, block_m: int = 128, block_n: int = 128) -> dict:
        """Empty / partial / full tile counts (for logging and FLOP counting)."""
        return self.block_meta(block_m, block_n).summary()

    def tiles_touched(self, block_m: int = 128, block_n: int = 128) -> int:
        s = self.block_summary(block_m, block_n)
        return s["partial"] + s["full"]

    def partial_tile(self, meta: BlockMeta, b: int, h: int, m: int, n: int) -> torch.Tensor:
        """bool (block_m, block_n) element mask of one partial tile, decided from the metadata alone."""
        if meta.ranges is not None:
            r = meta.ranges[b, :, m * meta.block_m:(m + 1) * meta.block_m]
            k = torch.arange(n * meta.block_n, (n + 1) * meta.block_n, device=r.device, dtype=torch.int32)
            tile = _in_ranges(r, k)
            return torch.nn.functional.pad(tile, (0, 0, 0, meta.block_m - tile.shape[0]))
        return unpack_bits(meta.tile_bits[meta.bits_index[b, h, m, n]])

    def check_against(self, b: int, h_q: int, n_q: int, n_k: int):
        """Raise unless this mask fits attention of ``b`` samples, ``h_q`` query heads, Nq x Nk."""
        mb, mh, mq, mk = self.shape
        if (mq, mk) != (n_q, n_k):
            fail("mask", f"a mask for Nq={n_q}, Nk={n_k}", f"one built for Nq={mq}, Nk={mk}")
        if mb not in (1, b):
            fail("mask", f"batch 1 or {b}", f"batch {mb}")
        if mh not in (1, h_q):
            fail("mask", f"heads 1 or {h_q} (query heads)", f"heads {mh}")

    def host_documents(self) -> torch.Tensor:
        """The document ids of a document mask, int ``(Bm, N)`` on the host: those it was built from, or a copy
        of ``documents`` (one device sync, once per mask)."""
        if self.documents is None:
            fail("mask", "a document mask (Mask.from_documents without window or prefix)", repr(self))
        if self._host_documents is None:
            self._host_documents = self.documents.cpu()
        return self._host_documents

    def __repr__(self):
        kind = "ranges" if self.is_structured else ("dense, RCM-reordered" if self.perm is not None else "dense")
        return f"Mask({kind}, shape={self.shape}, device={self.device})"


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool (B, N): True at each document's first token (a run of equal ids is one document)."""
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return start


def document_spans(doc_ids: torch.Tensor):
    """(first, length), int64 on the host: each document's first token as a flat index into (B, N) ids, and its
    length (a document never crosses rows: each row starts one). Ids on a GPU are copied to the host (a sync).
    Computed with numpy, on one thread (torch's CPU ops wake its thread pool, which took tens of ms per 64k batch
    beside a training step)."""
    ids = doc_ids.cpu().numpy()
    starts = np.ones(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = np.flatnonzero(starts).astype(np.int64)
    return torch.from_numpy(first), torch.from_numpy(np.diff(first, append=np.int64(ids.size)))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a GPU through pinned memory without waiting for the GPU."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def _in_ranges(ranges: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """bool (..., rows, len(keys)): key in [lo0, hi0) or [lo1, hi1) of each row, from ranges (..., 4, rows)."""
    lo0, hi0, lo1, hi1 = ranges.unsqueeze(-1).unbind(-3)
    return ((keys >= lo0) & (keys < hi0)) | ((keys >= lo1) & (keys < hi1))
