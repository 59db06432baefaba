"""Model inputs of the tests: a loader-like packed micro-batch."""
import torch

from bbm.testing import document_positions, random_doc_ids


def packed_batch(b: int, n: int, vocab: int, max_docs: int, seed: int) -> dict:
    """A loader-like batch: random tokens in random documents, positions restarting per document, labels the
    next token of the same document (-100 on each document's last token), the row's tail as padding."""
    generator = torch.Generator().manual_seed(seed)
    doc_ids = random_doc_ids(b, n, max_docs, generator=generator)
    pad = torch.randint(0, n // 4, (b,), generator=generator)
    pos = torch.arange(n).expand(b, n)
    doc_ids = torch.where(pos >= n - pad[:, None], doc_ids[:, -1:] + 1, doc_ids)  # padding: its own document
    tokens = torch.randint(0, vocab, (b, n), generator=generator)
    position_ids = document_positions(doc_ids)
    same_doc = torch.cat([doc_ids[:, 1:] == doc_ids[:, :-1], torch.zeros(b, 1, dtype=torch.bool)], dim=1)
    labels = torch.where(same_doc, tokens.roll(-1, dims=1), -100)
    labels = torch.where(pos >= n - pad[:, None], -100, labels)
    return {"tokens": tokens, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def fields(batch: dict):
    """tokens, labels, position_ids, doc_ids of a batch."""
    return batch["tokens"], batch["labels"], batch["position_ids"], batch["doc_ids"]
