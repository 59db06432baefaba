"""Sources, tokenizers and preparation: round trips, equal datasets from equal documents, bad input."""
import json
import multiprocessing as mp
import os
import runpy
import sys


import numpy as np
import pytest

from bbm.data import DataConfig, TokenDataset, load_tokenizer, prepare, write_dataset
from bbm.data import build
from bbm.data.sources import list_files
from bbm.data.tokenizer import token_dtype

from helpers.data import random_texts, train_tokenizer, write_text_dir
from helpers.processes import REPO


def documents(path):
    ds = TokenDataset(path)
    return [ds.document(d) for d in range(ds.num_documents)]


def byte_docs(texts):
    return [np.frombuffer(t.encode(), np.uint8).astype(np.int64).tolist() + [256] for t in texts]


def test_byte_round_trip(texts):
    tok = load_tokenizer("byte")
    for text in texts[:10] + ["", "\x00\xff ü 中 😀"]:
        ids = tok.encode(text)
        assert ids.max(initial=0) < 256 and len(ids) == len(text.encode())
        assert tok.decode(ids) == text
        assert tok.decode(np.append(ids, tok.eod_id)) == text


def test_hf_round_trip(texts, hf_tokenizer):
    tok = load_tokenizer(hf_tokenizer)
    assert tok.eod_id == tok.tok.token_to_id("<|endoftext|>") and tok.vocab_size <= 300
    for text in texts[:10] + random_texts(1, 5) + ["a literal <|endoftext|> is text"]:
        ids = tok.encode(text)
        assert len(ids) < len(text.encode())   # BPE merged something
        assert tok.decode(ids) == text and tok.eod_id not in ids


def test_hf_tokenizer_without_eod_gets_one(tmp_path, texts):
    tok = load_tokenizer(train_tokenizer(tmp_path / "t.json", texts, eod=False))
    assert tok.eod_token == "<|endoftext|>" and tok.eod_id == tok.vocab_size - 1
    assert tok.eod_id not in tok.encode(texts[0]).tolist()


def test_text_dir_dataset_is_the_documents(byte_dataset, texts):
    ds = TokenDataset(byte_dataset)
    assert ds.meta["tokenizer"]["kind"] == "byte" and ds.tokens.dtype == np.uint16
    assert ds.num_documents == len(texts) and ds.num_tokens == sum(len(t.encode()) + 1 for t in texts)
    assert [d.tolist() for d in documents(byte_dataset)] == byte_docs(texts)


def test_four_sources_give_one_dataset(tmp_path, texts):
    """text_dir, jsonl (custom field, blank line, extra keys), parquet (two files) and their globs agree."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = texts[:12]
    write_text_dir(tmp_path / "txt", texts)
    (tmp_path / "jl").mkdir()
    for part, chunk in enumerate((texts[:5], texts[5:])):
        lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(chunk)]
        (tmp_path / "jl" / f"part{part}.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
        pq.write_table(pa.table({"id": list(range(len(chunk))), "body": chunk}), tmp_path / f"part{part}.parquet")
    cache = str(tmp_path / "cache")
    cfgs = [DataConfig(source="text_dir", path=str(tmp_path / "txt"), cache_dir=cache, num_workers=1),
            DataConfig(source="jsonl", path=str(tmp_path / "jl"), text_field="body", cache_dir=cache, num_workers=1),
            DataConfig(source="jsonl", path=str(tmp_path / "jl/*.jsonl"), text_field="body", cache_dir=cache,
                       num_workers=1),
            DataConfig(source="parquet", path=str(tmp_path), text_field="body", cache_dir=cache, num_workers=1)]
    dirs = [prepare(c, progress=False) for c in cfgs]
    assert len(set(dirs)) == len(dirs)
    for d in dirs:
        assert [x.tolist() for x in documents(d)] == byte_docs(texts)


def test_stdlib_source(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_documents=6, num_workers=1)
    files = [f for f in list_files("stdlib", None) if f.stat().st_size][:6]
    assert files == sorted(files, key=lambda f: f.as_posix()) and all(f.suffix == ".py" for f in files)
    assert [d.tolist() for d in documents(prepare(cfg, progress=False))] == \
        [list(f.read_bytes()) + [256] for f in files]


def test_workers_and_tokenizers_agree(tmp_path, text_dir, texts, hf_tokenizer, monkeypatch):
    """Several processes give the same dataset as one; every document decodes to its text."""
    monkeypatch.setattr(build, "BATCH_DOCS", 7)
    one, two = (prepare(DataConfig(source="text_dir", path=str(text_dir), tokenizer=hf_tokenizer,
                                   cache_dir=str(tmp_path / f"c{n}"), num_workers=n), progress=False) for n in (1, 2))
    tok = load_tokenizer(hf_tokenizer)
    docs = documents(two)
    assert [d.tolist() for d in docs] == [d.tolist() for d in documents(one)]
    assert all(d[-1] == tok.eod_id and tok.eod_id not in d[:-1] for d in docs)
    assert [tok.decode(d) for d in docs] == texts
    assert TokenDataset(two).meta["tokenizer"]["sha256"] == TokenDataset(one).meta["tokenizer"]["sha256"]


def test_prepare_is_idempotent_and_keyed_on_files(tmp_path, texts):
    corpus = write_text_dir(tmp_path / "txt", texts[:5])
    cfg = DataConfig(source="text_dir", path=str(corpus), cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = prepare(cfg, progress=False)
    stamp = os.stat(first / "meta.json").st_mtime_ns
    assert prepare(cfg, progress=False) == first and os.stat(first / "meta.json").st_mtime_ns == stamp
    (corpus / "doc0000.txt").write_text("changed")
    second = prepare(cfg, progress=False)
    assert second != first and documents(second)[0].tolist() == list(b"changed") + [256]


def cache_entries(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_exception_mid_prepare_leaves_nothing(tmp_path, text_dir, monkeypatch):
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("tokenizer crashed")
        return encode(batch)

    encode = build._encode
    monkeypatch.setattr(build, "BATCH_DOCS", 5)
    monkeypatch.setattr(build, "_encode", failing)
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        prepare(cfg, progress=False)
    assert len(calls) == 3 and cache_entries(tmp_path / "cache") == []


def _die_mid_prepare(cfg):
    calls = []
    encode = build._encode

    def dying(batch):
        calls.append(1)
        if len(calls) == 3:
            os._exit(3)   # a hard crash: no exception handler runs
        return encode(batch)

    build.BATCH_DOCS, build._encode = 5, dying
    prepare(cfg, progress=False)


def test_hard_crash_leaves_no_complete_looking_dataset(tmp_path, text_dir, texts):
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    child = mp.get_context("fork").Process(target=_die_mid_prepare, args=(cfg,))
    child.start()
    child.join()
    assert child.exitcode == 3
    left = cache_entries(tmp_path / "cache")
    assert len(left) == 1 and left[0].startswith(".") and ".tmp." in left[0]
    assert not (tmp_path / "cache" / left[0] / "meta.json").exists()
    with pytest.raises(ValueError, match="dataset_dir"):
        TokenDataset(tmp_path / "cache" / left[0])
    # The next prepare writes the dataset and removes the dead process's temporary directory.
    done = prepare(cfg, progress=False)
    assert cache_entries(tmp_path / "cache") == [done.name]
    assert [d.tolist() for d in documents(done)] == byte_docs(texts)


def test_bad_input(tmp_path, texts, hf_tokenizer):
    cache = str(tmp_path / "cache")

    def run(**kw):
        return prepare(DataConfig(cache_dir=cache, num_workers=1, **kw), progress=False)

    with pytest.raises(ValueError, match=r"data\.path: expected an existing .* got '.*missing' \(not found\)"):
        run(source="text_dir", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="data.path: expected a file"):
        DataConfig(source="jsonl")
    with pytest.raises(ValueError, match="data.source: expected one of"):
        DataConfig(source="csv", path="x")
    with pytest.raises(ValueError, match=r"unknown keys \['batch'\]"):
        DataConfig.from_dict({"source": "stdlib", "batch": 3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least one of the files .* got none in"):
        run(source="text_dir", path=str(tmp_path / "empty"))
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(ValueError, match="at least one non-empty document .* got none in"):
        run(source="text_dir", path=str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{bad}:3: expected one JSON object per line, got invalid JSON"):
        run(source="jsonl", path=str(bad))
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: expected a JSON object with the text field 'text'.*\['body'\]"):
        run(source="jsonl", path=str(bad))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(TypeError, match=rf"{bad}:1: expected a string in the text field, got int"):
        run(source="jsonl", path=str(bad))
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_text("fine")
    (latin / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin / 'b.txt'}: expected UTF-8 text for the tokenizer .*offset 3"):
        run(source="text_dir", path=str(latin), tokenizer=hf_tokenizer)
    assert len(documents(run(source="text_dir", path=str(latin)))) == 2   # bytes need no decoding
    with pytest.raises(ValueError, match=r"data.token_dtype: expected a dtype that holds vocab_size 257 "
                                         r"\(uint16 or wider\), got 'uint8'"):
        run(source="text_dir", path=str(latin), token_dtype="uint8")
    with pytest.raises(ValueError, match="vocab_size: expected at most 4294967296 ids"):
        token_dtype(2 ** 32 + 1)
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16 and token_dtype(2 ** 16 + 1) == np.uint32
    with pytest.raises(ValueError, match="data.tokenizer: expected 'byte' or the path"):
        run(tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="data.tokenizer: expected a readable"):
        run(tokenizer=str(bad))
    # Nothing was left behind by the failures above, only the one dataset that succeeded.
    assert [p for p in cache_entries(tmp_path / "cache") if p.startswith(".")] == []


def test_parquet_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a", None]}), path)
    cfg = dict(source="parquet", path=str(path), cache_dir=str(tmp_path / "c"), num_workers=1)
    with pytest.raises(ValueError, match=rf"{path}: expected a column 'text' .*, got columns \['body'\]"):
        prepare(DataConfig(**cfg), progress=False)
    with pytest.raises(TypeError, match=rf"{path}:row 1: expected a string in the text field, got NoneType"):
        prepare(DataConfig(text_field="body", **cfg), progress=False)


def test_cli(tmp_path, text_dir, texts, capsys, monkeypatch):
    """data/prepare.py: a config's data: section, overridden by flags."""
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {{}}\ndata:\n  source: text_dir\n  path: {text_dir}\n  max_documents: 3\n")
    script = REPO / "data" / "prepare.py"
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--config", str(config), "--cache-dir", str(tmp_path / "c"),
                                      "--num-workers", "1", "--max-documents", "4", "--quiet"])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert json.loads("\n".join(lines[1:]))["num_documents"] == 4
    assert [d.tolist() for d in documents(lines[0])] == byte_docs(texts[:4])


def test_write_dataset_from_arrays(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 30)
    tokens = rng.integers(0, 1000, lengths.sum()).astype(np.uint16)
    path = write_dataset(tmp_path / "ids", tokens, lengths, vocab_size=1000, eod_id=999, pad_id=999)
    ds = TokenDataset(path)
    assert ds.tokens.dtype == np.uint16 and ds.lengths.tolist() == lengths.tolist()
    assert np.array_equal(np.concatenate([ds.document(d) for d in range(30)]), tokens)
    with pytest.raises(ValueError, match="lengths: expected positive document lengths summing to len"):
        write_dataset(tmp_path / "bad", tokens, lengths + 1, vocab_size=1000, eod_id=999, pad_id=999)
    assert cache_entries(tmp_path) == ["ids"]
