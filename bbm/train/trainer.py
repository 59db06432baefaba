"""The training loop on a DeepSpeed engine: packed batches with one attention mask per micro-batch, evaluation on
held-out documents, metrics (a log line on stdout and in train.log, metrics.jsonl, W&B, a progress bar on a
terminal), the resolved config in config.yaml, crash-safe checkpoints, SIGTERM/SIGINT save-and-exit.

One class of ~500 lines, on purpose: its methods are the phases of one run and share its state (engine, loader,
groups, run directory); what stands apart lives in the modules it calls (checkpoint, resume, stop, sink, flops,
profiling, feasibility)."""
import dataclasses
import logging
import math
import random
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from bbm._checks import fail
from bbm._files import write_atomic
from bbm._tensors import to_device
from bbm.data import IGNORE_INDEX
from bbm.distributed import ParallelGroups, UlyssesAttention, sequence_parallel_loss, shard_batch
from bbm.model import Decoder, attend, build_mask
from bbm.model.decoder import Block
from bbm.train import checkpoint as ckpt
from bbm.train import feasibility, resume
from bbm.train.config import TrainConfig, to_dict, to_yaml
from bbm.train.ds_config import deepspeed_config
from bbm.train.env import init_distributed
from bbm.train.flops import attention_gain, dense_pairs, peak_tflops, step_flops
from bbm.train.optim import apply_hyperparameters, build_optimizer, build_schedule
from bbm.train.profiling import StepProfiler
from bbm.train.run_lock import RunLock
from bbm.train.sink import CONFIG_FILE, LOG_FILE, METRICS_FILE, MetricsSink, RunLog, eval_line, log_line, read_metrics
from bbm.train.stop import StopSignal, exit_code


class Interval:
    """Sums between two log records: losses, tokens, FLOPs; wall time from the last reset."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.losses, self.grad_norms = [], []
        self.totals = torch.zeros(4, dtype=torch.float64)  # tokens, flops, dense-convention flops, pairs
        self.steps = self.skipped = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Trainer:
    """``Trainer(cfg).train()``. ``loader`` (optional) replaces the data section's PackedLoader: any
    iterable of batch dicts with ``vocab_size``, ``state_dict()`` and ``load_state_dict()``; such a run evaluates
    only on ``eval_batches`` (a list of batch dicts), if given."""

    def __init__(self, cfg: TrainConfig, loader=None, local_rank: Optional[int] = None, eval_batches=None):
        self.cfg = cfg
        self.env = init_distributed(cfg.run.device, local_rank)
        self.run_dir = Path(cfg.run.dir)
        self.eval_batches = eval_batches or []
        self.log = RunLog(self.run_dir, self.env.is_main)
        self.lock = self._lock_run_dir()
        try:
            self._setup(loader)
        except BaseException:
            self._unlock_run_dir()
            raise

    def _setup(self, loader):
        cfg = self.cfg
        self.groups = ParallelGroups(cfg.deepspeed.sequence_parallel_size)  # data parallel x sequence parallel
        self.sp = self.groups.sp_size
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        if cfg.model.attention == "flex" and self.env.device.type == "cpu":
            fail("model.attention", "'bbm', 'sdpa_masked' or 'sdpa_causal' on CPU (FlexAttention has no CPU backward)",
                 "'flex'")
        self.loader = loader if loader is not None else self._make_loader()
        vocab = cfg.model.vocab_size or self.loader.vocab_size
        if vocab < self.loader.vocab_size:
            fail("model.vocab_size", f"at least the tokenizer's {self.loader.vocab_size}", vocab)
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
        seed_everything(cfg.run.seed)  # the same initial weights on every rank
        model = Decoder(self.model_cfg, checkpoint_layers=cfg.deepspeed.activation_checkpointing)
        if self.sp > 1:  # Ulysses: all-to-all around attention, each rank attends over n_heads / sp heads
            model.attention_fn = UlyssesAttention(self.groups.sp_group, attend)
        if cfg.deepspeed.zero_stage == 3:  # gather a block's parameters at once, as its compiled regions use them
            deepspeed.utils.set_z3_leaf_modules(model, [Block])
        self.matmul_params = model.matmul_params()
        optimizer = build_optimizer(model, cfg.optimizer)
        schedule = build_schedule(optimizer, cfg.schedule, cfg.run.max_steps)
        self.ds_config = deepspeed_config(cfg, self.groups.dp_size)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=self.ds_config, dist_init_required=False,
                                               mpu=self.groups if self.sp > 1 else None)
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        self.peak = peak_tflops(cfg.metrics.peak_tflops, self.env.device)
        self.checkpoints = ckpt.Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.env.rank)
        self.step = self.start_step = 0
        self.tokens_seen = 0
        self.tokens_per_step = (cfg.run.seq_len * cfg.run.micro_batch_size * cfg.deepspeed.gradient_accumulation_steps
                                * self.groups.dp_size)
        self.saved_step = None
        self.last_checkpoint = None
        self._resume()

    # ------------------------------------------------------------------ setup
    def _make_loader(self):
        from bbm.data import PackedLoader, prepare

        cfg, env = self.cfg, self.env
        if env.is_main:  # rank 0 tokenises; the others then find the prepared dataset (or build their own)
            prepare(cfg.data)
        dist.barrier()
        path = prepare(cfg.data)
        # every rank of a sequence-parallel group reads the same packed samples
        shape = dict(seq_len=cfg.run.seq_len, batch_size=cfg.run.micro_batch_size, rank=self.groups.dp_rank,
                     world_size=self.groups.dp_size, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                     eval_fraction=cfg.data.eval_fraction)
        if cfg.eval.every:  # the same held-out batches at every evaluation, this rank's share of each
            held_out = iter(PackedLoader(path, split="eval", prefetch=0, **shape))
            per_batch = cfg.run.seq_len * cfg.run.micro_batch_size * self.groups.dp_size
            self.eval_batches = [next(held_out) for _ in range(math.ceil(cfg.eval.tokens / per_batch))]
        return PackedLoader(path, prefetch=cfg.data.prefetch, **shape)

    def _lock_run_dir(self) -> Optional[RunLock]:
        """Rank 0 locks the run directory for the run's life; a run directory in use stops every rank."""
        lock = error = None
        if self.env.is_main:
            try:
                lock = RunLock(self.run_dir)
            except RuntimeError as e:
                error = e
        if self._any_rank(error is not None):
            raise error or RuntimeError(f"run.dir: {self.run_dir} is in use by another run (rank 0 names it)")
        if lock is not None and lock.taken_over:
            self._print(f"run dir lock: taking over from {lock.taken_over}, which ended without releasing it")
        return lock

    def _unlock_run_dir(self):
        if self.lock is not None:
            self.lock.release()

    def _resume(self):
        """Continues from the newest checkpoint that verifies (``checkpoint.resume``), naming each one skipped;
        a changed config key that cannot change is an error, the others are applied and announced."""
        cfg = self.cfg
        paths = ckpt.candidates(cfg.checkpoint.resume, self.checkpoints.root)
        if not paths:
            if cfg.checkpoint.resume == "none" and self.env.is_main:
                self.checkpoints.clear()
            dist.barrier()
            return
        path = ckpt.first_verified(paths, self._print)
        if path is None:
            fail("checkpoint.resume", "a checkpoint whose files match its manifest (each one skipped is named above)",
                 f"none of {len(paths)} under {paths[0].parent}", RuntimeError)
        state = ckpt.read_state(path)
        changes = resume.compare(state["config"], to_dict(cfg), state["world_size"], self.env.world_size, path)
        rank_state = self.checkpoints.load(self.engine, path)
        apply_hyperparameters(self.engine.lr_scheduler, cfg.optimizer)  # loading restored the saved values
        self.step = self.start_step = self.saved_step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.last_checkpoint = path
        for line in changes:
            self._print(line)
        self._print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ helpers
    def _print(self, text: str):
        self.log.line(text)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` holds on any rank (one tiny all-reduce)."""
        if self.env.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _to_device(self, batch: dict) -> dict:
        """What the model reads of a loader batch, on the device; the document ids go in the mask instead."""
        return {k: to_device(v, self.env.device) for k, v in batch.items() if k != "doc_ids"}

    def _device_batch(self, host: dict):
        """A loader batch on the device (this rank's share of it, with sequence parallelism) and its mask."""
        batch = self._to_device(host)
        # whole sequence, every layer; from the host's ids, whose document spans the FLOP count and bbm's document
        # plans read without a device sync
        mc = self.model_cfg
        batch_mask = build_mask(host["doc_ids"], mc.attention, mc.bbm_backend, check=False, device=self.env.device,
                                layer_windows=mc.layer_windows(), prefix_fraction=mc.prefix_fraction)  # ids are runs
        batch["labels"] = batch_mask.hide_prefix_labels(batch["labels"])
        if self.sp > 1:
            batch = shard_batch(batch, self.groups.sp_rank, self.sp)
        return batch, batch_mask

    def _forward(self, batches, skipped: list):
        """Loss of the next micro-batch, with the batch, its mask and its allowed pairs (counted on the host). With
        run.on_nonfinite=skip, one with a finite loss on every rank: a non-finite one is dropped and replaced by the
        next batch. With stop, the step checks its losses at its end (``_stop_if_nonfinite``), so a forward pass
        does not wait for its loss to reach the host."""
        run = self.cfg.run
        while True:
            with record_function("bbm.batch"):  # profiler annotations name the step's phases
                host = next(batches)
                batch, batch_mask = self._device_batch(host)
                pairs = batch_mask.allowed_pairs()
            with record_function("bbm.forward"):
                loss = self.engine(batch["tokens"], batch["position_ids"], batch_mask, batch["labels"])
                if self.sp > 1:  # this rank's share of the whole sequence's mean loss
                    loss = sequence_parallel_loss(loss, batch["labels"], self.groups.sp_group)
                if run.on_nonfinite == "stop" or not self._any_rank(not bool(torch.isfinite(loss.detach()))):
                    return batch, batch_mask, loss, pairs
            step = self.step + 1
            skipped.append(step)
            if len(skipped) > run.max_skips:
                fail("loss", f"at most run.max_skips={run.max_skips} non-finite micro-batches in a row at step {step}",
                     len(skipped), FloatingPointError)
            self._print(f"step {step}: non-finite loss, micro-batch skipped ({len(skipped)} in a row)")

    def _stop_if_nonfinite(self, losses: list, grad_norm):
        """run.on_nonfinite=stop: fails naming the step if one of its losses (on any rank) or its gradient norm
        is not finite. A non-finite loss makes the norm non-finite, so the losses are read on the host only then
        (or where no norm is kept): no sync in the common case."""
        if grad_norm is not None and math.isfinite(grad_norm):
            return
        step = self.step + 1
        values = [float(x) for x in losses]
        if self._any_rank(not all(map(math.isfinite, values))):
            fail("loss", f"a finite value at step {step} on every rank (set run.on_nonfinite=skip to drop such "
                         "batches)", values, FloatingPointError)
        if grad_norm is not None:
            fail("grad_norm", f"a finite value at step {step}: the step is applied, resume from the last checkpoint "
                              "(run.on_nonfinite=skip makes DeepSpeed skip such steps)", float(grad_norm),
                 FloatingPointError)

    def _grad_norm_fp32(self) -> float:
        """Gradient 2-norm where DeepSpeed keeps none (ZeRO 0 without bf16: grads are already averaged)."""
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, batches, interval: Interval):
        accum = self.cfg.deepspeed.gradient_accumulation_steps
        mc = self.model_cfg
        lr = self.engine.get_lr()[0]
        grad_norm = None
        for micro in range(accum):
            skipped = []
            batch, batch_mask, loss, pairs = self._forward(batches, skipped)
            interval.skipped += len(skipped)
            with record_function("bbm.backward"):
                self.engine.backward(loss)
            with record_function("bbm.optimizer"):  # at the accumulation boundary; otherwise bookkeeping
                if micro == accum - 1 and not hasattr(self.engine.optimizer, "_global_grad_norm"):
                    grad_norm = self._grad_norm_fp32()
                self.engine.step()
            tokens = batch["tokens"].numel()
            pairs /= self.sp  # this rank attends for 1/sp of the heads
            b, n = batch["tokens"].shape[0], batch["tokens"].shape[1] * self.sp
            interval.losses.append(loss.detach().float())
            interval.totals += torch.tensor([
                tokens, step_flops(self.matmul_params, tokens, mc.n_layers, mc.n_heads, mc.head_dim, pairs),
                step_flops(self.matmul_params, tokens, mc.n_layers, mc.n_heads, mc.head_dim, dense_pairs(b, n) / self.sp),
                pairs], dtype=torch.float64)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        if self.cfg.run.on_nonfinite == "stop":
            self._stop_if_nonfinite(interval.losses[-accum:], grad_norm)
        interval.grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        interval.steps += 1
        self.last_mask = batch_mask
        self.lr = lr

    # ------------------------------------------------------------------ metrics
    def _record(self, interval: Interval, elapsed: float) -> dict:
        """The log record of an interval; collective (sums over ranks)."""
        env = self.env
        loss = torch.stack(interval.losses).mean().to(env.device)
        totals = interval.totals.to(env.device)
        if env.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.groups.dp_size  # sequence-parallel ranks hold shares of one loss: sum over SP, mean over DP
            dist.all_reduce(totals)
        tokens, flops, dense_flops, pairs = totals.tolist()
        n = self.cfg.run.seq_len
        tflops = flops / elapsed / env.world_size / 1e12
        tflops_dense = dense_flops / elapsed / env.world_size / 1e12
        return {
            "step": self.step, "epoch": getattr(self.loader, "epoch", None), "loss": float(loss),
            "lr": self.lr, "grad_norm": float(np.mean(interval.grad_norms)),
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / interval.steps, "tokens_seen": self.tokens_seen,
            "tflops": tflops, "mfu": tflops / self.peak if self.peak else None,
            "tflops_dense_convention": tflops_dense, "mfu_dense_convention": tflops_dense / self.peak if self.peak else None,
            "attention_density": pairs / (tokens * n), "peak_mem_gib": peak_memory_gib(env.device),
            "skipped_batches": interval.skipped, "attention": self.model_cfg.attention, "device": env.device.type,
        }

    def _evaluate(self) -> dict:
        """Loss per target token on the held-out batches (the same ones each time; collective), its perplexity, the
        tokens it covers and its wall time."""
        start = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # loss sum, target tokens
        self.engine.eval()
        with torch.no_grad():
            for host in self.eval_batches:
                batch, batch_mask = self._device_batch(host)
                targets = (batch["labels"] != IGNORE_INDEX).sum().double()
                loss = self.engine(batch["tokens"], batch["position_ids"], batch_mask, batch["labels"])
                sums += torch.stack([loss.double() * targets, targets])  # this rank's shard: mean * its targets
        self.engine.train()
        if self.env.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, targets = sums.tolist()
        loss = loss_sum / max(targets, 1)
        tokens = len(self.eval_batches) * self.cfg.run.seq_len * self.cfg.run.micro_batch_size * self.groups.dp_size
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": tokens,
                "eval_time_s": time.perf_counter() - start}

    def _gain(self) -> dict:
        """Rank 0 times the chosen attention against dense causal SDPA on the last micro-batch's mask."""
        gain = {}
        if self.env.is_main:
            mc = self.model_cfg
            gain = attention_gain(self.last_mask.layer(0), mc.n_heads, mc.kv_heads, mc.head_dim, self.dtype, self.env.device)
        dist.barrier()
        return gain

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(),
                 "config": to_dict(self.cfg), "world_size": self.env.world_size}
        self.last_checkpoint = self.checkpoints.save(self.engine, self.step, state, {"rng": ckpt.rng_state()})
        self.saved_step = self.step

    def _check_fits(self):
        """Before the first step: an error (on every rank) if the step is far too large for the device, a warning
        if it may not fit (``bbm.train.feasibility``)."""
        error, warning = feasibility.check(self.cfg, self.model_cfg, self.env.world_size, feasibility.local_ranks(),
                                           self.sp, self.env.device)
        if self._any_rank(error is not None):
            raise MemoryError(error or "a step that fits every rank's device (rank 0 names the keys)")
        if warning:
            self._print(warning)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Trains to run.max_steps or until a signal; returns the summary, whose ``exit_code`` is 0, or 128 + the
        signal number after a stop by signal (``bbm.train.stop``). The run directory is unlocked at the end."""
        try:
            return self._train()
        finally:
            self._unlock_run_dir()

    def _train(self) -> dict:
        cfg, env = self.cfg, self.env
        if self.start_step == 0:
            self.log.clear()
        self._print(self._banner())
        self._check_fits()
        if env.is_main:  # the resolved config (the tokenizer's vocabulary filled in): --config it to run it again
            write_atomic(self.run_dir / CONFIG_FILE, to_yaml(dataclasses.replace(cfg, model=self.model_cfg)))
        sink = MetricsSink(self.run_dir, cfg.wandb, to_dict(cfg), self.start_step) if env.is_main else None
        bar = None
        if env.is_main and cfg.metrics.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm
            bar = self.log.bar = tqdm(total=cfg.run.max_steps, initial=self.step, desc="train", unit="step",
                                      dynamic_ncols=True, leave=False)
        stop = StopSignal()
        stop.install()
        profiler = StepProfiler(cfg.metrics.profile_steps, self.run_dir, env.rank, env.device)
        batches = iter(self.loader)
        interval = Interval(env.device)
        started = time.perf_counter()
        first = last = last_eval = None
        stopped = False
        try:
            while self.step < cfg.run.max_steps:
                if self._any_rank(stop.signum is not None):
                    stopped = True
                    break
                profiler.before_step(self.step + 1)
                step_start = time.perf_counter()
                self._train_step(batches, interval)
                stop.step_took(time.perf_counter() - step_start)
                self.step += 1
                profiler.after_step(self.step)
                self.tokens_seen += self.tokens_per_step
                if bar is not None:
                    bar.update(1)
                final = self.step == cfg.run.max_steps
                gain_due = cfg.metrics.gain_every and self.step % cfg.metrics.gain_every == 0
                eval_due = bool(self.eval_batches and cfg.eval.every) and (self.step % cfg.eval.every == 0 or final)
                log_due = self.step % cfg.metrics.log_every == 0 or self.step == self.start_step + 1 or final
                if log_due or gain_due or eval_due:
                    record = self._record(interval, interval.elapsed())
                    if gain_due:
                        record.update(self._gain())
                    if eval_due:
                        record.update(self._evaluate())
                    if sink is not None:
                        now = time.perf_counter() - started
                        record["elapsed_s"] = sink.elapsed_s + now
                        if self.start_step and first is None:
                            record["resumed_at"] = self.start_step  # the dashboard marks where the run resumed
                        sink.log(record)
                        first, last = first or record, record
                        # the latest interval's pace (the first step, with its warm-up, is no guide)
                        warm = self.step > self.start_step + 1
                        eta = record["step_time_s"] * (cfg.run.max_steps - self.step) if warm else None
                        self._print(log_line(record, cfg.run.max_steps, eta))
                        if eval_due:
                            last_eval = record
                            self._print(eval_line(record, cfg.run.max_steps))
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    interval.reset()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                    interval.reset()
        except BaseException:
            stop.restore()
            raise
        finally:
            stop.at_boundary()  # saving and the summary are not cut short by the stop's grace period
            getattr(batches, "close", lambda: None)()  # stops the loader's prefetch thread
            profiler.close()
            if bar is not None:
                bar.close()
                self.log.bar = None
        if self.saved_step != self.step and (cfg.checkpoint.at_end or stopped):
            self.save()
        summary = {"step": self.step, "stopped": stopped, "exit_code": exit_code(stop.signum if stopped else None),
                   "run_dir": str(self.run_dir),
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None, "first": first,
                   "last": last, "last_eval": last_eval}
        if sink is not None:
            summary["wandb_dir"] = str(sink.wandb_dir) if sink.wandb_dir else None
            sink.close()
            from bbm.train.dashboard import write_dashboard  # matplotlib only where a dashboard is drawn

            summary["dashboard"] = str(write_dashboard(self.run_dir)) if read_metrics(self.run_dir) else None
            self._print(self._closing(summary, stop.signum))
        dist.barrier()  # no rank exits (and makes a launcher stop the others) before rank 0 wrote the summary
        stop.restore()
        return summary

    def _banner(self) -> str:
        cfg, env, mc = self.cfg, self.env, self.model_cfg
        ds = cfg.deepspeed
        held_out = (f"eval every {cfg.eval.every} steps on {len(self.eval_batches)} held-out batches"
                    if self.eval_batches else "no evaluation")
        return (f"bbm train: {self.matmul_params / 1e6:.2f}M params ({mc.n_layers} layers, dim {mc.dim}, "
                f"{mc.n_heads}/{mc.kv_heads} heads), attention={mc.attention}, seq_len={cfg.run.seq_len}, "
                f"{self.tokens_per_step} tokens/step, ZeRO-{ds.zero_stage}{', bf16' if ds.bf16 else ''}, "
                f"{env.world_size} x {env.device.type}, steps {self.step} -> {cfg.run.max_steps}, {held_out}, "
                f"run dir {self.run_dir}")

    def _closing(self, summary: dict, signum) -> str:
        first, last, held_out = summary["first"], summary["last"], summary.get("last_eval")
        run = self.run_dir
        head = (f"stopped by signal {signum} at step {self.step} (exit code {summary['exit_code']})" if summary["stopped"]
                else f"finished at step {self.step}")
        if first and last:
            head += f"; loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})"
        if held_out:
            head += f"; eval loss {held_out['eval_loss']:.3f}, ppl {held_out['eval_ppl']:.2f} (step {held_out['step']})"
        lines = [f"bbm train: {head}",
                 f"  config      {run / CONFIG_FILE}   (the resolved config: --config it to run it again)",
                 f"  log         {run / LOG_FILE}",
                 f"  metrics     {run / METRICS_FILE}",
                 f"  dashboard   {summary.get('dashboard')}   (redraw: python -m bbm.train.dashboard {run})"]
        if summary["checkpoint"] is None:
            lines.append("  checkpoint  none written (checkpoint.at_end=false, no checkpoint.every step reached)")
        else:
            lines += [f"  checkpoint  {summary['checkpoint']}   (checkpoint.resume=auto, the default, continues from it)",
                      f"  generate    python -m bbm.generate {run} --prompt 'def '",
                      f"  export      python -m bbm.export {run} {run / 'export'}   (safetensors + Hugging Face "
                      f"LLaMA config.json)"]
        if summary.get("wandb_dir"):
            lines.append(f"  wandb       {summary['wandb_dir']}   (upload later: wandb sync {summary['wandb_dir']})")
        return "\n".join(lines)
