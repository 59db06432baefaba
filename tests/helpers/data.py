"""Helpers of the data tests: small random corpora and a tiny trained tokenizer (no download)."""
import numpy as np

SEQ_LEN = 64
ALPHABET = list("abcdefghij klmnop\n") + ["é", "ß", "→", "中", "😀"]


def random_texts(seed: int, n: int):
    """Unicode texts of long-tailed length, some longer than SEQ_LEN tokens; no text's byte length is a
    multiple of SEQ_LEN, so no document ends with a chunk that is its end-of-document token alone."""
    rng = np.random.default_rng(seed)
    texts = []
    while len(texts) < n:
        text = "".join(rng.choice(ALPHABET, size=int(rng.lognormal(3.5, 1.0)) + 1))
        if len(text.encode()) % SEQ_LEN:
            texts.append(text)
    return texts


def write_text_dir(path, texts):
    path.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (path / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    return path


def train_tokenizer(path, texts, eod: bool = True):
    """A byte-level BPE tokenizer.json of ~300 ids trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"] if eod else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)
