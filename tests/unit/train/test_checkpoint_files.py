"""Checkpoint files on their own: the manifest catches every change to a checkpoint directory and names the file,
bbm's rank files load weights-only (a pickled payload is refused by name and never runs), and the random-number
states survive the round trip exactly."""
import json
import os
import random

import numpy as np
import pytest
import torch

from bbm.train import checkpoint as ckpt
from bbm.train import manifest, safe_load


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "step_00000002"
    (d / "sub").mkdir(parents=True)
    (d / "a.pt").write_bytes(b"x" * 1000)
    (d / "sub" / "b.pt").write_bytes(b"y" * 10)
    manifest.write(d, step=2, world_size=1)
    return d


def test_manifest_lists_every_file_and_an_untouched_directory_verifies(saved):
    listed = manifest.read(saved)
    assert listed["step"] == 2 and sorted(listed["files"]) == ["a.pt", "sub/b.pt"]
    assert listed["files"]["a.pt"]["size"] == 1000 and manifest.problem(saved) is None


@pytest.mark.parametrize("change, expected", [
    (lambda d: (d / "a.pt").write_bytes(b"x" * 999 + b"z"), "a.pt: sha256 differs from the manifest's"),
    (lambda d: (d / "a.pt").write_bytes(b"x" * 10), "a.pt: 10 bytes, the manifest says 1000"),
    (lambda d: (d / "sub" / "b.pt").unlink(), "sub/b.pt: listed in the manifest, missing"),
    (lambda d: (d / "c.pt").write_bytes(b""), "c.pt: not in the manifest"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: expected the checkpoint's manifest, got no such file"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: expected a JSON manifest"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"format": manifest.FORMAT, "files": {"a.pt": 3}})),
     "manifest.json: expected a manifest of format"),
])
def test_any_change_is_found_naming_the_file(saved, change, expected):
    change(saved)
    assert f"{saved}/{expected}" in manifest.problem(saved)


def test_first_verified_skips_by_name(tmp_path, saved):
    older = tmp_path / "step_00000001"
    older.mkdir()
    (older / "a.pt").write_bytes(b"old")
    manifest.write(older, step=1, world_size=1)
    (saved / "a.pt").write_bytes(b"x" * 1000 + b"!")
    lines = []
    assert ckpt.first_verified(ckpt.newest_first(tmp_path), lines.append) == older
    assert lines == [f"checkpoint {saved} skipped: {saved}/a.pt: 1001 bytes, the manifest says 1000"]


def test_pickled_payload_is_refused_naming_the_file(tmp_path):
    marker, file = tmp_path / "marker", tmp_path / "rank_00000.pt"
    torch.save({"rng": Payload(marker)}, file)
    with pytest.raises(Exception) as error:
        safe_load.load(file)
    assert str(error.value).startswith(f"{file}: expected a checkpoint file of tensors and plain data")
    assert "GLOBAL" in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def test_damaged_or_missing_rank_file_is_an_error_naming_it(tmp_path):
    file = tmp_path / "rank_00000.pt"
    torch.save({"rng": ckpt.rng_state()}, file)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^{file}: expected a readable checkpoint file, got "):
        safe_load.load(file)
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'nope.pt'}: expected an existing checkpoint file"):
        safe_load.load(tmp_path / "nope.pt")


def test_rng_states_round_trip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(safe_load.load(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
