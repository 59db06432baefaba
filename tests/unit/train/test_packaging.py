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


def test_config_modules_load_without_torch_and_exports_resolve():
    """bbm's packages import their public names on first use: the config modules need no torch, and the names
    keep their meaning (``bbm.attention`` is the function even after the module of that name is imported)."""
    import subprocess
    import sys

    probe = ("import sys\nimport bbm.train.config, bbm.data.config, bbm.model.config, bbm.train.cli\n"
             "print('torch' in sys.modules)\n"
             "import bbm.attention, bbm\nfrom bbm.data import PackedLoader\nfrom bbm.model import Decoder\n"
             "print(callable(bbm.attention) and not isinstance(bbm.attention, type(bbm)), bbm.Mask.__name__,\n"
             "      PackedLoader.__name__, Decoder.__name__, 'Mask' in dir(bbm))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert proc.stdout.split() == ["False", "True", "Mask", "PackedLoader", "Decoder", "True"], proc.stderr
