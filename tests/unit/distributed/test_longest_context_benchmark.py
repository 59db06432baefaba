"""benchmarks/longest_context.py: the search (against a probe with a known limit), the outcome of a probe from its
exit, the plan per GPU count (sequence parallel over the GPUs that split the heads), and one real probe on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.processes import REPO, benchmark_module



@pytest.fixture(scope="module")
def bench():
    return benchmark_module("longest_context")


def limit_probe(bench, limit, calls):
    def probe(n):
        calls.append(n)
        return bench.FITS if n <= limit else bench.OOM
    return probe


@pytest.mark.parametrize("limit,start", [(700_000, 884_736), (700_000, 100_000), (16_384, 1_000_000),
                                         (5_000_000, 4_000_000), (123_456, 123_456)])
def test_search_finds_the_limit(bench, limit, start):
    calls = []
    fit, fail, probes = bench.search(limit_probe(bench, limit, calls), start, 16384, upper=4_194_304)
    want = min(limit, 4_194_304) // 16384 * 16384
    assert fit == want and [n for n, _ in probes] == calls and len(calls) == len(set(calls))
    assert fail == (None if want == 4_194_304 else want + 16384)
    assert all(n % 16384 == 0 and 16384 <= n <= 4_194_304 for n in calls) and len(calls) <= 16


def test_interrupted_search_continues_from_its_probes(bench):
    calls = []
    whole = bench.search(limit_probe(bench, 700_000, calls), 884_736, 16384, upper=4_194_304)
    for cut in range(1, len(whole[2])):
        again = []
        resumed = bench.search(limit_probe(bench, 700_000, again), 884_736, 16384, upper=4_194_304,
                               known=whole[2][:cut])
        assert resumed[:2] == whole[:2] and not set(again) & {n for n, _ in whole[2][:cut]}
        assert len(again) <= len(whole[2]) - cut + 1


def test_search_when_nothing_fits_or_a_probe_errs(bench):
    fit, fail, probes = bench.search(lambda n: bench.OOM, 100_000, 1024, upper=1 << 20, grow=2.0)
    assert fit is None and fail == 1024 and probes[-1] == (1024, bench.OOM)
    outcomes = iter([bench.FITS, bench.ERROR])
    fit, fail, probes = bench.search(lambda n: next(outcomes), 4096, 1024, upper=1 << 20)
    assert fit == 4096 and fail is None and [o for _, o in probes] == [bench.FITS, bench.ERROR]


def test_outcome_of_a_probe(bench):
    assert bench.classify(0, "") == bench.FITS and bench.classify(None, "") == bench.TIMEOUT
    assert bench.classify(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate") == bench.OOM
    assert bench.classify(1, "ValueError: run.seq_len: expected ...") == bench.ERROR


def test_plan_per_gpu_count(bench, capsys):
    plans = bench.main(["--dry-run", "--device", "cpu", "--gpus", "1,2,4,8"])
    layouts = {(Path(c).stem, g): (dp, sp) for c, g, dp, sp, _ in plans}
    assert layouts == {("gpt_125m_16k", 1): (1, 1), ("gpt_125m_16k", 2): (1, 2), ("gpt_125m_16k", 4): (1, 4),
                       ("gpt_125m_16k", 8): (2, 4),  # 12 heads do not split 8 ways
                       ("gpt_1b_64k", 1): (1, 1), ("gpt_1b_64k", 2): (1, 2), ("gpt_1b_64k", 4): (1, 4),
                       ("gpt_1b_64k", 8): (1, 8)}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    for line, (_, gpus, _, sp, _) in zip(lines, plans):
        assert f"deepspeed.sequence_parallel_size={sp}" in line and "deepspeed.activation_checkpointing=true" in line
        assert ("deepspeed.launcher.runner --num_gpus " + str(gpus)) in line if gpus > 1 else " train.py " in line


def test_one_probe_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "longest.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["--device", "cpu", "--gpus", "1", "--configs", "configs/tiny_cpu.yaml", "--granularity", "128",
            "--max-seq", "256", "--steps", "1", "--out", str(out), "model.dim=64", "model.n_layers=2",
            "model.n_heads=4", "model.n_kv_heads=2", "data.max_documents=40", f"data.cache_dir={tmp_path / 'data'}"]
    proc = subprocess.run([sys.executable, "benchmarks/longest_context.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["gpus"], row["dp"], row["sp"], row["longest"], row["first_failing"]) == (1, 1, 1, 256, None)
    assert row["predicted"] > 256 and row["probes"][0]["outcome"] == "fits" and row["peak_mem_gib"] > 0
    assert ">= 256" in proc.stdout and row["complete"]
    (again,) = bench.main(args)  # the count is in the results: nothing runs
    assert again == row and "measured earlier" in capsys.readouterr().out
