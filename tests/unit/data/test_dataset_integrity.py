"""A prepared dataset that was changed after it was prepared is refused, naming the file: a meta.json dtype or
count that does not match tokens.bin, bytes changed in tokens.bin, a truncated file, a missing or unreadable
meta.json. The checksum is verified on first use and after a file changes, not at every open. A dataset
directory that lost its meta.json is prepared again instead of blocking every retry."""
import json
import os
import time

import numpy as np
import pytest

from bbm.data import DataConfig, TokenDataset, prepare, write_dataset
from bbm.data import dataset as dataset_module


@pytest.fixture
def text_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i} " * (i + 1))
    return corpus


def make(path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 20)
    tokens = rng.integers(0, 300, lengths.sum()).astype(np.uint16)
    return write_dataset(path, tokens, lengths, vocab_size=300, eod_id=299, pad_id=299)


def age(path, seconds=60):
    """Moves the files' mtimes into the past (as if prepared a while ago)."""
    for name in ("tokens.bin", "offsets.npy"):
        past = time.time() - seconds
        os.utime(path / name, (past, past))


def edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_meta_dtype_that_does_not_match_the_file_names_it(tmp_path):
    path = make(tmp_path / "ds")
    edit_meta(path, dtype="uint8")
    with pytest.raises(ValueError, match=rf"^{path / 'tokens.bin'}: expected \d+ tokens of uint8 \(\d+ bytes\) as "
                                         rf"{path / 'meta.json'} says, got \d+ bytes \(meta.json's dtype or counts"):
        TokenDataset(path)


def test_changed_tokens_fail_the_checksum_naming_the_file(tmp_path):
    path = make(tmp_path / "ds")
    data = bytearray((path / "tokens.bin").read_bytes())
    data[10:12] = (7).to_bytes(2, "little") if data[10:12] != (7).to_bytes(2, "little") else (8).to_bytes(2, "little")
    (path / "tokens.bin").write_bytes(bytes(data))  # in vocabulary, same size
    with pytest.raises(ValueError, match=rf"^{path / 'tokens.bin'}: expected sha256 .* got .*changed after it was "
                                         rf"prepared\); delete {path} to prepare it again"):
        TokenDataset(path)


def test_truncated_tokens_name_the_file(tmp_path):
    path = make(tmp_path / "ds")
    with open(path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=rf"^{path / 'tokens.bin'}: expected \d+ bytes as meta.json records, got 10 "
                                         "bytes"):
        TokenDataset(path)


def test_missing_or_unreadable_meta_names_it(tmp_path):
    path = make(tmp_path / "ds")
    (path / "meta.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=rf"^{path / 'meta.json'}: expected the JSON description of a prepared "
                                         "dataset, got JSONDecodeError"):
        TokenDataset(path)
    (path / "meta.json").unlink()
    with pytest.raises(ValueError, match=rf"^dataset_dir: expected a prepared dataset directory \(with meta.json\), "
                                         rf"got '{path}' \(no {path / 'meta.json'}\)"):
        TokenDataset(path)


def test_checksum_runs_on_first_use_and_after_a_change_only(tmp_path, monkeypatch):
    path = make(tmp_path / "ds")
    hashed = []
    real = dataset_module.sha256_file
    monkeypatch.setattr(dataset_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    TokenDataset(path)
    TokenDataset(path)
    assert hashed == ["tokens.bin", "offsets.npy"] * 2  # just written: not yet trusted to the file times
    age(path)
    hashed.clear()
    TokenDataset(path)
    TokenDataset(path)
    assert hashed == ["tokens.bin", "offsets.npy"]  # verified once, recorded in verified.json
    os.utime(path / "tokens.bin")  # touched: verified again
    hashed.clear()
    TokenDataset(path)
    assert hashed == ["tokens.bin"]


def test_dataset_that_lost_its_meta_is_prepared_again(tmp_path, text_dir, capsys):
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = prepare(cfg, progress=False)
    (first / "meta.json").unlink()
    again = prepare(cfg, progress=False)
    assert again == first and TokenDataset(again).num_documents == 12
    assert f"prepare: {first} had no meta.json (damaged); preparing it again" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]


def test_prepare_refuses_a_changed_dataset_naming_the_file(tmp_path, text_dir):
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    path = prepare(cfg, progress=False)
    with open(path / "offsets.npy", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match=rf"^{path / 'offsets.npy'}: expected sha256 "):
        prepare(cfg, progress=False)
