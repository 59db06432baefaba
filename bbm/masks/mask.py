"""`Mask`: what may attend to what. The user states the mask; bbm picks the representation. (One class of ~400
lines: a constructor per kind of mask, and the views every path reads.)

Two representations:

* **ranges** (structured masks: documents, causal, windows, prefix-LM, global tokens): per query row
  at most two key intervals, an int32 tensor ``(Bm, 4, Nq)`` of ``lo0, hi0, lo1, hi1``. O(N) memory;
  no N x N tensor is ever built.
* **dense** (arbitrary masks, tree masks): a bool ``(Bm, Hm, Nq, Nk)`` tensor, of which the tile metadata
  keeps the partial tiles only, bit-packed. Optionally reordered with Reverse Cuthill-McKee.
"""
from typing import Optional

import torch

from bbm._checks import check_positive_int, check_tensor, fail
from bbm._tensors import to_device
from bbm.masks.documents import document_spans, document_starts
from bbm.masks.reorder import rcm_permutation
from bbm.masks.tiles import TileMeta, dense_meta, ranges_meta, unpack_bits

DEFAULT_TILE = 64
SPARSE_DENSITY = 0.1  # below this, reorder="auto" tries Reverse Cuthill-McKee


class Mask:
    """A boolean attention mask of logical shape ``(Bm, Hm, Nq, Nk)``; ``Bm`` and ``Hm`` may be 1
    (shared by every sample / head). Build it with one of the constructors, not ``Mask(...)``. Immutable: what is
    derived from it (tile metadata, document spans) is computed once and kept; attention paths keep their own
    plans."""

    def __init__(self, *, n_q: int, n_k: int, ranges=None, dense=None, perm=None, causal=False, documents=None,
                 documents_causal=True, window=None, prefix=None, host_documents=None, host_prefix=None):
        self.n_q, self.n_k = n_q, n_k
        self.ranges = ranges  # int32 (Bm, 4, Nq) or None
        self.dense = dense  # bool (Bm, Hm, Nq, Nk), already reordered when perm is set, or None
        self.perm = perm  # int64 (N,): row/column i of `dense` is token perm[i]; None if not reordered
        # A mask built from document ids keeps how (``from_documents``' arguments), so that a path can run its
        # documents as plain attentions: the ids int (Bm, N), causal or not, the window, the prefix bool (Bm, N)
        self.documents, self.documents_causal, self.window, self.prefix = documents, documents_causal, window, prefix
        self._causal = causal  # built as a plain causal mask, Nq == Nk
        # computed once and kept: tile metadata by tile shape, document spans, the ids and prefix on the host
        self._derived = {"host_documents": host_documents, "host_prefix": host_prefix}
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"Mask.{name}: a Mask is immutable once built; build a new one with a constructor")
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ranges(cls, lo0, hi0, lo1=None, hi1=None, *, n_k: int):
        """Key ``j`` is allowed for query ``i`` iff ``lo0[b,i] <= j < hi0[b,i]`` or ``lo1[b,i] <= j < hi1[b,i]``.
        Each bound is an int tensor ``(B, Nq)``; intervals are clipped to ``[0, n_k)``."""
        check_positive_int("n_k", n_k)
        if n_k >= 2**31:
            fail("n_k", "fewer than 2**31 keys", n_k)
        bounds = [lo0, hi0] + ([lo1, hi1] if lo1 is not None or hi1 is not None else [])
        names = ["lo0", "hi0", "lo1", "hi1"]
        for name, t in zip(names, bounds):
            check_tensor(name, t, ndim=2, dtype_kind="int")
            if t.shape != bounds[0].shape:
                fail(name, f"shape {tuple(bounds[0].shape)} like lo0", f"shape {tuple(t.shape)}")
            if t.device != bounds[0].device:
                fail(name, f"device {bounds[0].device} like lo0", t.device)
        return cls(n_q=lo0.shape[-1], n_k=n_k, ranges=_normalised_ranges(bounds, n_k))

    @classmethod
    def from_dense(cls, allowed, *, reorder: Optional[str] = "auto"):
        """``allowed``: bool ``(B or 1, H or 1, Nq, Nk)``, or ``(Nq, Nk)`` for one mask shared by every sample and
        head; True = may attend.

        ``reorder="rcm"`` permutes tokens with Reverse Cuthill-McKee so scattered non-zeros gather into
        fewer tiles (needs Nq == Nk). ``"auto"`` (default) tries it on extremely sparse square masks
        (density < 10%) and keeps it only if it touches fewer tiles; ``None`` never reorders.
        ``bbm.attention`` applies and undoes the permutation, so results are unchanged."""
        check_tensor("allowed", allowed, dtype_kind="bool")
        if allowed.ndim == 2:
            allowed = allowed.view(1, 1, *allowed.shape)
        if allowed.ndim != 4:
            fail("allowed", "a (Nq, Nk) or (B, H, Nq, Nk) tensor", f"shape {tuple(allowed.shape)}")
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
        (the cuDNN ragged path's, ``bbm.attention.ragged``) then need no device sync."""
        check_tensor("doc_ids", doc_ids, ndim=2, dtype_kind="int")
        check_positive_int("window", window, allow_none=True)
        b, n = doc_ids.shape
        if n == 0 or b == 0:
            fail("doc_ids", "a non-empty (B, N) tensor", f"shape {tuple(doc_ids.shape)}")
        host = doc_ids if doc_ids.device.type == "cpu" else None
        host_prefix = prefix if isinstance(prefix, torch.Tensor) and prefix.device.type == "cpu" else None
        if device is not None and torch.device(device) != doc_ids.device:
            doc_ids = to_device(doc_ids, device)
            if isinstance(prefix, torch.Tensor):
                prefix = to_device(prefix, device)
        dev = doc_ids.device
        is_start = document_starts(doc_ids)
        if check:
            runs = is_start.sum(1)
            distinct = 1 + (doc_ids.sort(dim=1).values.diff(dim=1) != 0).sum(1)
            if bool((runs != distinct).any()):
                fail("doc_ids", "each document id to form one contiguous run",
                     "an id that appears in two separate runs")
        described = dict(n_q=n, n_k=n, documents=doc_ids, documents_causal=causal, window=window, prefix=prefix,
                         host_documents=host, host_prefix=host_prefix)
        if doc_ids.is_cuda and causal and prefix is None:  # the training case: one Triton launch
            from bbm.masks.tiles_gpu import document_ranges  # imported lazily: CPU users never load Triton
            return cls(ranges=document_ranges(doc_ids, window), **described)
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
        return cls(ranges=_normalised_ranges([lo, hi], n), **described)

    @classmethod
    def causal(cls, n_q: int, n_k: Optional[int] = None, *, window: Optional[int] = None, device=None):
        """Plain causal mask; with ``Nq != Nk`` the queries are the last ``Nq`` positions (bottom-right)."""
        check_positive_int("n_q", n_q)
        n_k = n_q if n_k is None else check_positive_int("n_k", n_k)
        check_positive_int("window", window, allow_none=True)
        if window is not None and n_q == n_k:  # a sliding window: described as one document per row
            return cls.sliding_window(n_q, window, device=device)
        q = torch.arange(n_q, device=device, dtype=torch.int32).unsqueeze(0) + (n_k - n_q)
        lo = torch.zeros_like(q) if window is None else (q - window + 1).clamp(min=0)
        return cls(n_q=n_q, n_k=n_k, ranges=_normalised_ranges([lo, q + 1], n_k), causal=window is None and n_q == n_k)

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

    @property
    def is_causal(self) -> bool:
        """Built as a plain causal mask with Nq == Nk (``Mask.causal``)."""
        return self._causal

    @property
    def exactly_causal(self) -> bool:
        """A plain causal mask (Nq == Nk), as built or as found: causal documents, one per sample (which reads the
        document spans: a device sync for a mask built from ids on a GPU, once)."""
        if self._causal:
            return True
        return self.plain_documents and self.documents_causal and self.one_document_per_sample

    @property
    def one_document_per_sample(self) -> bool:
        """Built from document ids, each sample one document (reads the document spans: see ``exactly_causal``)."""
        return self.documents is not None and self.document_spans()[0].numel() == self.batch

    @property
    def plain_documents(self) -> bool:
        """Built from document ids with neither window nor prefix: every document is one plain attention."""
        return self.documents is not None and self.window is None and self.prefix is None

    def allowed_pairs(self) -> int:
        """Exact number of allowed (query, key) pairs, summed over the mask's batch and heads: from the host's
        document spans where a document mask was built from host ids (no device sync), else from the ranges or the
        dense mask."""
        if self._causal:
            return self.batch * self.n_q * (self.n_q + 1) // 2
        if self._counts_on_host():
            return self._document_pairs()
        if self.dense is not None:
            return int(self.dense.sum())
        r = self.ranges.long()
        len0 = (r[:, 1] - r[:, 0]).clamp(min=0)
        len1 = (r[:, 3] - r[:, 2]).clamp(min=0)
        overlap = (torch.minimum(r[:, 1], r[:, 3]) - torch.maximum(r[:, 0], r[:, 2])).clamp(min=0)
        overlap = torch.where((len0 > 0) & (len1 > 0), overlap, 0)
        return int((len0 + len1 - overlap).sum())

    def _counts_on_host(self) -> bool:
        """A document mask whose pairs ``_document_pairs`` counts from host ids (not both a window and a prefix)."""
        host = self._derived
        return (self.documents is not None and host["host_documents"] is not None
                and (self.prefix is None or (host["host_prefix"] is not None and self.window is None))
                and (self.window is None or self.documents_causal))

    def _document_pairs(self) -> int:
        """Pairs per document of length L: causal L(L+1)/2, bidirectional L^2; a causal window W caps each query's
        keys at W; a prefix of P adds what its queries see ahead, P(P-1)/2."""
        length = self.document_spans()[1]
        if not self.documents_causal:
            return int((length * length).sum())
        if self.window is None:
            pairs = length * (length + 1) // 2
        else:
            w = self.window
            pairs = torch.where(length <= w, length * (length + 1) // 2, w * (w + 1) // 2 + (length - w) * w)
        if self.prefix is not None:
            p = self.prefix_lengths()
            pairs = pairs + p * (p - 1) // 2
        return int(pairs.sum())

    @property
    def density(self) -> float:
        """Exact fraction of allowed pairs."""
        return self.allowed_pairs() / (self.batch * self.heads * self.n_q * self.n_k)

    def tile_meta(self, tile_m: int = DEFAULT_TILE, tile_n: int = DEFAULT_TILE) -> TileMeta:
        """Tile classification and compacted lists for tiles of ``tile_m`` queries x ``tile_n`` keys
        (in the reordered token order when reordered). Built once per tile shape and cached."""
        check_positive_int("tile_m", tile_m)
        check_positive_int("tile_n", tile_n)
        key = ("tiles", tile_m, tile_n)
        if key not in self._derived:
            if self.ranges is not None:
                self._derived[key] = ranges_meta(self.ranges, self.n_k, tile_m, tile_n)
            else:
                self._derived[key] = dense_meta(self.dense, tile_m, tile_n)
        return self._derived[key]

    def tile_summary(self, tile_m: int = 128, tile_n: int = 128) -> dict:
        """Empty / partial / full tile counts (for logging and FLOP counting)."""
        return self.tile_meta(tile_m, tile_n).summary()

    def tiles_touched(self, tile_m: int = 128, tile_n: int = 128) -> int:
        s = self.tile_summary(tile_m, tile_n)
        return s["partial"] + s["full"]

    def partial_tile(self, meta: TileMeta, b: int, h: int, m: int, n: int) -> torch.Tensor:
        """bool (tile_m, tile_n) element mask of one partial tile, decided from the metadata alone."""
        if meta.ranges is not None:
            r = meta.ranges[b, :, m * meta.tile_m:(m + 1) * meta.tile_m]
            k = torch.arange(n * meta.tile_n, (n + 1) * meta.tile_n, device=r.device, dtype=torch.int32)
            tile = _in_ranges(r, k)
            return torch.nn.functional.pad(tile, (0, 0, 0, meta.tile_m - tile.shape[0]))
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
        """The document ids of a mask built from them, int ``(Bm, N)`` on the host: those it was built from, or a
        copy (one device sync, once per mask)."""
        if self.documents is None:
            fail("mask", "a mask built by Mask.from_documents", repr(self))
        if self._derived["host_documents"] is None:
            self._derived["host_documents"] = self.documents.cpu()
        return self._derived["host_documents"]

    def document_spans(self):
        """(first, length) of every document, int64 on the host (see ``bbm.masks.documents.document_spans``);
        computed once per mask."""
        if "spans" not in self._derived:
            self._derived["spans"] = document_spans(self.host_documents())
        return self._derived["spans"]

    def prefix_lengths(self) -> torch.Tensor:
        """int64 on the host: each document's prefix length, in ``document_spans`` order (all 0 without prefix)."""
        first, length = self.document_spans()
        if self.prefix is None:
            return torch.zeros_like(length)
        if self._derived["host_prefix"] is None:
            self._derived["host_prefix"] = self.prefix.cpu()
        counts = torch.cat([torch.zeros(1, dtype=torch.int64), self._derived["host_prefix"].flatten().long().cumsum(0)])
        return counts[first + length] - counts[first]

    def __repr__(self):
        kind = "ranges" if self.is_structured else ("dense, RCM-reordered" if self.perm is not None else "dense")
        return f"Mask({kind}, shape={self.shape}, device={self.device})"


def _normalised_ranges(bounds, n_k: int) -> torch.Tensor:
    """int32 (B, 4, Nq) ranges from two or four (B, Nq) bounds: clipped to [0, n_k) (in int64, then narrowed), an
    empty interval as [0, 0) so that tile bounds ignore it."""
    if len(bounds) == 2:
        bounds = [*bounds, torch.zeros_like(bounds[0]), torch.zeros_like(bounds[0])]
    r = torch.stack([b.to(torch.int64).clamp(0, n_k).to(torch.int32) for b in bounds], dim=1)
    for j in (0, 2):
        empty = r[:, j] >= r[:, j + 1]
        r[:, j] = torch.where(empty, 0, r[:, j])
        r[:, j + 1] = torch.where(empty, 0, r[:, j + 1])
    return r.contiguous()


def _in_ranges(ranges: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """bool (..., rows, len(keys)): key in [lo0, hi0) or [lo1, hi1) of each row, from ranges (..., 4, rows)."""
    lo0, hi0, lo1, hi1 = ranges.unsqueeze(-1).unbind(-3)
    return ((keys >= lo0) & (keys < hi0)) | ((keys >= lo1) & (keys < hi1))
