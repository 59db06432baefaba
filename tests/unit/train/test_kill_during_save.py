"""kill -9 at random moments of checkpoint saves never loses the last complete checkpoint, and resuming from what
is left stays bit-identical to a run that was never interrupted.

A child process imports torch and DeepSpeed once, then forks a worker per trial (a fresh one-rank gloo group,
a small ZeRO-3 bf16 model on a DeepSpeed engine, bbm's real Checkpointer). Each worker resumes the run from its
newest checkpoint that verifies and then trains, saving after every step, until the child SIGKILLs it at a
random moment; the child then checks every checkpoint directory left. At the end a worker resumes once more and
trains two steps, and its weights are compared bit for bit with an uninterrupted run of as many steps."""
import gc
import os
import random
import select
import signal
import time
import traceback
from pathlib import Path

import pytest

from helpers.processes import findings_of, report_findings
TRIALS = 20
WIDTH = 256  # 4 x 256 x 256 weights: saves of about 1.3 MB of DeepSpeed files


# ---------------------------------------------------------------------------------------------- the forked worker
def _batch(step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    return torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)


def _worker(root: Path, report: int, until: int, save: bool):
    """Resumes from ``root`` (if a checkpoint verifies), then trains (and saves, if ``save``) after every step up
    to ``until``; writes "ready", then "saved <step>" per save, to the pipe ``report``; then saves the fp32 master
    weights to ``root``.weights.pt. Ends with os._exit."""
    import deepspeed
    import torch

    from bbm.train import checkpoint as ckpt
    from bbm.train.env import free_port, init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    checkpointer = ckpt.Checkpointer(root, keep_last=2, rank=0)
    step = 0
    path = ckpt.first_verified(ckpt.candidates("auto", root), lambda line: None)
    if path is not None:
        ckpt.set_rng_state(checkpointer.load(engine, path)["rng"])
        step = ckpt.read_state(path)["step"]
    os.write(report, b"ready\n")
    while step < until:
        x, y = _batch(step)
        loss = torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
        step += 1
        if save:
            state = {"step": step, "tokens_seen": 0, "loader": {}, "config": {}, "world_size": 1}
            checkpointer.save(engine, step, state, {"rng": ckpt.rng_state()})
            os.write(report, f"saved {step}\n".encode())
    torch.save([t.detach().clone() for t in engine.optimizer.fp32_partitioned_groups_flat], weights_file(root))
    os._exit(0)


def weights_file(root: Path) -> Path:
    return root.with_name(root.name + ".weights.pt")


def _fork(root: Path, until: int, save: bool = True):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            _worker(root, write, until, save)
        finally:
            traceback.print_exc()
            os._exit(1)
    os.close(write)
    return pid, read


def _lines(fd: int, timeout: float) -> list:
    """What the worker wrote until it closed the pipe or ``timeout`` passed with nothing new."""
    data = b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


# ---------------------------------------------------------------------------------------------- the child
def _child(work: Path) -> dict:
    import deepspeed  # noqa: F401  (what the workers use is imported once, before the forks)
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imported by deepspeed.initialize)
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import torch

    import bbm.train.env  # noqa: F401

    gc.freeze()  # the workers' garbage collections (ZeRO-3 runs one) skip everything imported so far

    from bbm.train import checkpoint as ckpt
    from bbm.train import manifest

    rng = random.Random(0)
    root = work / "run" / "checkpoints"
    trials, save_s = [], None
    for trial in range(TRIALS):
        pid, fd = _fork(root, until=10**6)
        lines = _lines_until(fd, b"ready")
        if save_s is None:  # the first trial measures a save, then dies like the others
            start = time.perf_counter()
            lines += _lines_until(fd, b"saved", count=3)
            save_s = (time.perf_counter() - start) / 3
        time.sleep(rng.uniform(0, 3 * save_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        saved = [int(line.split()[1]) for line in lines + _lines(fd, 0.0) if line.startswith("saved")]
        os.close(fd)
        left = sorted(p.name for p in root.iterdir())
        complete = [root / t for t in ckpt.complete_tags(root)]
        problems = {p.name: manifest.problem(p) for p in complete}
        newest = ckpt.first_verified(ckpt.candidates("auto", root), lambda line: None)
        trials.append({"saved": saved, "left": left, "problems": problems,
                       "newest": ckpt.read_state(newest)["step"] if newest else None})
    resumed_at = trials[-1]["newest"]
    pid, fd = _fork(root, until=resumed_at + 2)
    _lines(fd, 120.0)
    final_status = os.waitpid(pid, 0)[1]
    pid, fd = _fork(work / "uninterrupted", until=resumed_at + 2, save=False)
    _lines(fd, 120.0)
    whole_status = os.waitpid(pid, 0)[1]
    resumed, whole = (torch.load(weights_file(r)) for r in (root, work / "uninterrupted"))
    same = len(resumed) == len(whole) and all(torch.equal(a, b) for a, b in zip(resumed, whole))
    return {"trials": trials, "save_s": save_s, "final_status": final_status, "whole_status": whole_status,
            "bit_identical": same, "resumed_at": resumed_at}


def _lines_until(fd: int, word: bytes, count: int = 1) -> list:
    """Reads lines until ``count`` of them start with ``word``."""
    data = b""
    while sum(line.startswith(word) for line in data.splitlines()) < count:
        if not select.select([fd], [], [], 120)[0]:
            raise TimeoutError(f"no {word!r} from the worker")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"the worker ended before {word!r}: {data.decode()}")
        data += chunk
    return data.decode().splitlines()


# ---------------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = findings_of(__file__, tmp_path_factory.mktemp("killsave"), DS_ACCELERATOR="cpu")
    if "crash" in out:
        pytest.fail(out["crash"])
    return out


def test_kill_9_during_saves_keeps_the_last_complete_checkpoint(results):
    trials = results["trials"]
    assert len(trials) == TRIALS
    mid_save = 0
    for t in trials:
        assert all(p is None for p in t["problems"].values()), t  # every complete-looking checkpoint verifies
        last_saved = max([0, *t["saved"]])
        assert t["newest"] is not None and t["newest"] >= last_saved, t
        mid_save += any(name.startswith(("tmp.", "trash.")) for name in t["left"])
    assert mid_save >= TRIALS // 4, [t["left"] for t in trials]  # the kills did land inside saves


def test_resume_after_the_kills_is_bit_identical(results):
    assert results["final_status"] == 0 and results["whole_status"] == 0
    assert results["resumed_at"] > 0
    assert results["bit_identical"]


if __name__ == "__main__":
    report_findings(_child)
