"""The train.py command line: usage without arguments, --help, --print-config, overrides as key=value,
--key=value and --key value, one-line config errors (unknown keys with suggestions, values out of bounds or not
finite, YAML syntax) reported before torch is imported."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bbm.train.cli import main, parse_args
from bbm.train.config import SECTIONS, load_config, to_yaml

REPO = Path(__file__).resolve().parents[3]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``train.py argv`` in this process."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_no_arguments_prints_usage_and_presets(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: python train.py --config CONFIG")
    for name in ("tiny_cpu", "gpt_125m_16k", "gpt_350m_32k", "gpt_1b_64k"):
        assert f"\n  {name} " in err
    assert "python train.py --config tiny_cpu" in err


def test_help_lists_every_key_with_its_default(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for section, cls in SECTIONS.items():
        assert f"\n{section}:  " in out
        for f in dataclasses.fields(cls):
            assert f"\n  {section}.{f.name}=" in out, f"{section}.{f.name}"
    assert "  optimizer.lr=0.0003" in out and "peak learning rate; in (0, inf)" in out


def test_print_config_is_the_resolved_yaml(capsys):
    code, out, _ = run_cli(capsys, "--config", "tiny_cpu", "--print-config", "optimizer.lr=1e-3",
                           "--run.max_steps", "7", "--wandb.tags=[a, b]")
    assert code == 0
    tree = yaml.safe_load(out)
    assert tree["optimizer"]["lr"] == 1e-3 and tree["run"]["max_steps"] == 7 and tree["wandb"]["tags"] == ["a", "b"]
    assert list(tree) == list(SECTIONS) and tree["run"]["dir"] == "runs/tiny_cpu"
    # the printed YAML is a config file that loads back to the same config
    path = REPO / "configs" / "tiny_cpu.yaml"
    again = load_config(path, ["optimizer.lr=1e-3", "run.max_steps=7", "wandb.tags=[a, b]"])
    assert to_yaml(again) == out


@pytest.mark.parametrize("argv, overrides", [
    (["run.max_steps=3"], ["run.max_steps=3"]),
    (["--run.max_steps=3"], ["run.max_steps=3"]),
    (["--run.max_steps", "3", "--optimizer.lr", "-1"], ["run.max_steps=3", "optimizer.lr=-1"]),
    (["--local_rank=1", "--config=x.yaml", "a.b=c=d"], ["a.b=c=d"]),
])
def test_override_forms(argv, overrides):
    options, got = parse_args(argv)
    assert got == overrides


def test_override_without_value_or_key(capsys):
    assert "expected a value after it" in run_cli(capsys, "--config", "tiny_cpu", "--run.max_steps")[0]
    assert "expected an override section.key=value" in run_cli(capsys, "--config", "tiny_cpu", "max_steps")[0]


@pytest.mark.parametrize("override, message", [
    ("--max_steps=10", "max_steps: expected a section name (did you mean run.max_steps? keys sit under their "
                       "section: run.max_steps=10 on the command line), got an unknown key"),
    ("optimizer.lrr=1", "optimizer.lrr: expected a known key of 'optimizer' (did you mean optimizer.lr?)"),
    ("optimiser.lr=1", "optimiser: expected a section name (did you mean optimizer?)"),
    ("deepspeed.gradient_clipping=.nan", "deepspeed.gradient_clipping: expected a finite number in [0, inf), got nan"),
    ("optimizer.lr=.inf", "optimizer.lr: expected a finite number in (0, inf), got inf"),
    ("optimizer.lr=-1", "optimizer.lr: expected a number in (0, inf), got -1.0"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio: expected a number in [0, 1], got 1.5"),
    ("model.rope_theta=.nan", "model.rope_theta: expected a finite number in (0, inf), got nan"),
    ("data.eval_fraction=1", "data.eval_fraction: expected a number in [0, 1), got 1"),
    ("eval.tokens=0", "eval.tokens: expected a number in [1, inf), got 0"),
    ("metrics.peak_tflops=-.inf", "metrics.peak_tflops: expected a finite number in (0, inf), got -inf"),
])
def test_config_errors_are_one_line(capsys, override, message):
    code, out, err = run_cli(capsys, "--config", "tiny_cpu", override)
    assert code.startswith(f"config error: {message}") and "\n" not in code, code


def test_every_number_has_bounds():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "int" in str(f.type) or "float" in str(f.type):
                assert f.metadata.get("within") or f.metadata.get("choices"), f"{section}.{f.name}"


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  max_steps: 10\n  seq_len: [128\nmodel:\n  dim: 64\n")
    code, _, _ = run_cli(capsys, "--config", str(path))
    assert str(code).startswith(f"config error: {path}:4:"), code
    assert "\n" not in str(code)


def test_config_error_reported_before_torch_is_imported():
    """A separate interpreter: the error line comes out and torch was never imported."""
    probe = ("import sys, runpy; sys.argv = ['train.py', '--config', 'configs/tiny_cpu.yaml', 'optimizer.lr=-1']\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
             "except SystemExit as e:\n    print(e.code); print('torch' in sys.modules, 'deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.splitlines() == ["config error: optimizer.lr: expected a number in (0, inf), got -1.0",
                                        "False False"], proc.stdout + proc.stderr
