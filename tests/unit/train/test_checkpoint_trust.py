"""Resuming trusts no file: checkpoints load without running code, damaged ones are skipped by name, a changed
config is applied or refused key by key, a run directory in use is refused, and so is a step far too large for
the machine.

One child process (DeepSpeed keeps one process group per process) trains a tiny ZeRO-1 run with checkpoints
at steps 2 and 4, then resumes copies of it that were tampered with; the tests read its results."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers.processes import REPO, findings_of, report_findings

PRESET = REPO / "configs" / "tiny_cpu.yaml"
OVERRIDES = ["run.device=cpu", "run.seq_len=64", "run.micro_batch_size=2", "run.max_steps=4", "model.dim=32",
             "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.max_documents=20", "optimizer.lr=1e-2",
             "schedule.warmup_steps=0", "metrics.log_every=1", "metrics.gain_every=0", "metrics.progress_bar=false",
             "wandb.mode=disabled", "checkpoint.every=2", "checkpoint.keep_last=3", "checkpoint.resume=auto",
             "deepspeed.zero_stage=1"]
MODEL_STATES = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling it would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------- the child process
def _child(work: Path):
    import torch

    from bbm.train import Trainer, load_config
    from bbm.train import manifest
    from bbm.train.run_lock import RunLock

    marker = work / "marker"

    def config(name, *extra):
        return load_config(PRESET, [*OVERRIDES, f"data.cache_dir={work / 'data'}", f"run.dir={work / name}", *extra])

    def copy(name) -> Path:
        shutil.copytree(work / "base", work / name)
        return work / name / "checkpoints"

    def losses(name):
        return [json.loads(line)["loss"] for line in (work / name / "metrics.jsonl").read_text().splitlines()]

    def attempt(name, *extra, train=True):
        """Builds (and trains) a Trainer; the printed lines, the losses or the error, the marker's existence."""
        out = io.StringIO()
        result = {}
        try:
            with contextlib.redirect_stdout(out):
                trainer = Trainer(config(name, *extra))
                result["resumed_at"] = trainer.step
                result["optimizer_lr"] = trainer.engine.lr_scheduler.optimizer.param_groups[0]["lr"]
                if train:
                    trainer.train()
                    result["records"] = [json.loads(line) for line in
                                         (work / name / "metrics.jsonl").read_text().splitlines()]
        except Exception as e:  # the scenario's expected error, reported to the test
            result["error"] = f"{type(e).__name__}: {e}"
        result["lines"] = out.getvalue().splitlines()
        result["marker"] = marker.exists()
        return result

    results = {"child_pid": os.getpid()}
    Trainer(config("base", "checkpoint.resume=none")).train()
    results["base"] = {"losses": losses("base")}

    # a rank file replaced by a pickled payload, the manifest left as saved: step 4 is skipped, step 2 resumes
    root = copy("tampered")
    torch.save({"rng": Payload(marker)}, root / "step_00000004" / "rank_00000.pt")
    results["tampered"] = attempt("tampered")

    # the same payload with a manifest that matches it: the weights-only load refuses it, naming the file
    for name, file in (("payload_rank", "rank_00000.pt"), ("payload_model", MODEL_STATES)):
        root = copy(name)
        torch.save({"module": Payload(marker)}, root / "step_00000004" / file)
        manifest.write(root / "step_00000004", step=4, world_size=1)
        results[name] = attempt(name)

    root = copy("deleted")
    (root / "step_00000004" / "rank_00000.pt").unlink()
    results["deleted"] = attempt("deleted")

    root = copy("unverifiable")
    for tag in ("step_00000002", "step_00000004"):
        (root / tag / manifest.MANIFEST).unlink()
    results["unverifiable"] = attempt("unverifiable")

    copy("fixed")
    results["fixed"] = attempt("fixed", "model.dim=64", "deepspeed.zero_stage=0", "run.seed=1", train=False)

    copy("changed")
    results["changed"] = attempt("changed", "optimizer.lr=5e-3", "run.max_steps=5", "metrics.log_every=2")

    copy("locked")
    holder = RunLock(work / "locked")
    results["locked"] = attempt("locked", train=False)
    holder.release()
    results["unlocked"] = attempt("locked", train=False)

    # a step far beyond the host's memory stops before the first step, naming the keys
    results["infeasible"] = attempt("infeasible", "checkpoint.resume=none", "run.seq_len=100000000")
    return results


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("trust")
    out = findings_of(__file__, work, WANDB_MODE="disabled")
    out["work"] = str(work)
    return out


def scenario(results, name):
    if "crash" in results:
        pytest.fail(results["crash"])
    return results[name]


def test_tampered_checkpoint_is_skipped_by_name_and_the_previous_one_resumes_exactly(results):
    r = scenario(results, "tampered")
    assert "error" not in r, r
    skipped = [line for line in r["lines"] if "skipped" in line]
    assert len(skipped) == 1 and "step_00000004 skipped" in skipped[0] and "rank_00000.pt" in skipped[0]
    assert r["resumed_at"] == 2 and not r["marker"]
    assert [x["loss"] for x in r["records"]] == scenario(results, "base")["losses"]  # steps 3, 4 bit for bit


@pytest.mark.parametrize("name, file", [("payload_rank", "rank_00000.pt"), ("payload_model", MODEL_STATES)])
def test_pickled_payload_is_refused_naming_the_file(results, name, file):
    r = scenario(results, name)
    assert not r["marker"], "unpickling ran the payload"
    assert r["error"].startswith("UnpicklingError: ") and f"step_00000004/{file}: " in r["error"], r["error"]
    assert "weights_only" in r["error"] and "system" in r["error"]


def test_deleted_rank_file_fails_verification(results):
    r = scenario(results, "deleted")
    assert r["resumed_at"] == 2
    assert any("step_00000004 skipped" in line and "rank_00000.pt: listed in the manifest, missing" in line
               for line in r["lines"]), r["lines"]


def test_no_verifiable_checkpoint_is_an_error(results):
    r = scenario(results, "unverifiable")
    assert r["error"].startswith("RuntimeError: checkpoint.resume: expected a checkpoint whose files match")
    assert sum("manifest.json: expected the checkpoint's manifest" in line for line in r["lines"]) == 2


def test_keys_that_cannot_change_are_one_error_listing_each(results):
    error = scenario(results, "fixed")["error"]
    assert error.startswith("ValueError: checkpoint ") and "step_00000004" in error
    for change in ("model.dim 32 -> 64", "deepspeed.zero_stage 1 -> 0", "run.seed 0 -> 1"):
        assert change in error, error


def test_changed_lr_and_schedule_are_applied_and_announced(results):
    from bbm.train.config import ScheduleConfig
    from bbm.train.optim import lr_factor

    r = scenario(results, "changed")
    assert "error" not in r, r
    for line in ("resume: optimizer.lr 0.01 -> 0.005 (applied)", "resume: run.max_steps 4 -> 5 (applied)",
                 "resume: metrics.log_every 1 -> 2 (applied)"):
        assert line in r["lines"], r["lines"]
    expected = 5e-3 * lr_factor(4, ScheduleConfig(warmup_steps=0), 5)  # the step-5 lr of the new schedule
    assert r["optimizer_lr"] == expected
    assert r["records"][-1]["step"] == 5 and r["records"][-1]["lr"] == expected


def test_run_directory_in_use_is_refused_naming_the_holder(results):
    error = scenario(results, "locked")["error"]
    assert error.startswith("RuntimeError: run.dir: expected a run directory no other run is using")
    assert f"in use by pid {results['child_pid']} on host " in error and "started " in error
    assert "error" not in scenario(results, "unlocked")


def test_infeasible_step_is_refused_before_the_first_step(results):
    r = scenario(results, "infeasible")
    assert r["error"].startswith("MemoryError: run.seq_len=100000000, run.micro_batch_size=2: expected a step that "
                                 "fits in "), r["error"]
    assert "available host RAM" in r["error"] and not (Path(results["work"]) / "infeasible" / "metrics.jsonl").exists()


if __name__ == "__main__":
    report_findings(_child)
