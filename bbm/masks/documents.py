"""Documents of packed sequences: a run of equal consecutive ids in a ``(B, N)`` tensor is one document."""
import numpy as np
import torch


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool (B, N): True at each document's first token."""
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return start


def document_spans(doc_ids: torch.Tensor):
    """(first, length), int64 on the host: each document's first token as a flat index into the (B, N) ids, and
    its length (a document never crosses rows: each row starts one). Ids on a GPU are copied to the host (a sync).
    Computed with numpy, on one thread: torch's CPU ops would wake its thread pool beside a training step."""
    ids = doc_ids.cpu().numpy()
    starts = np.ones(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = np.flatnonzero(starts).astype(np.int64)
    return torch.from_numpy(first), torch.from_numpy(np.diff(first, append=np.int64(ids.size)))


def document_prefix(doc_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool (B, N), on the ids' device: True on each document's first ``floor(fraction * length)`` tokens."""
    start = document_starts(doc_ids)
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.where(start, pos, 0).cummax(dim=1).values
    end = torch.cat([start[:, 1:], torch.ones_like(start[:, :1])], dim=1)
    last = torch.where(end, pos, doc_ids.shape[1]).flip(1).cummin(dim=1).values.flip(1)
    return (pos - first) < ((last - first + 1) * fraction).floor().long()
