"""What an installed bbm offers: the bbm-train command and the presets, found by name from anywhere."""
import importlib
from pathlib import Path

import pytest

from bbm.train import config

REPO = Path(__file__).resolve().parents[3]


def test_console_entry_point_is_the_train_command():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["bbm-train"].partition(":")
    assert getattr(importlib.import_module(module), name) is importlib.import_module("bbm.train.cli").main


def test_presets_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(config.presets()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert config.find_config("tiny_cpu") == REPO / "configs" / "tiny_cpu.yaml"
    assert config.load_config("tiny_cpu").run.dir == "runs/tiny_cpu"


def test_installed_layout_is_searched(tmp_path, monkeypatch):
    """An installed package has no configs/ beside it: setup.py installs the presets as bbm/configs."""
    installed = tmp_path / "site-packages" / "bbm" / "configs"
    installed.mkdir(parents=True)
    (installed / "mine.yaml").write_text("run:\n  max_steps: 3\n")
    monkeypatch.setattr(config, "PRESET_DIRS", (tmp_path / "site-packages" / "configs", installed))
    assert config.load_config("mine").run.max_steps == 3
