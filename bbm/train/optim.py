"""AdamW with decoupled weight decay on matrices only, and a warmup + decay learning-rate schedule."""
import math

import torch

from bbm.train.config import OptimizerConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step for all parameters instead of a chain of foreach ones
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.kind == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_schedule(optimizer, cfg: ScheduleConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def apply_hyperparameters(schedule, cfg: OptimizerConfig):
    """Sets ``cfg``'s values on the optimizer that ``schedule`` drives, after a checkpoint's states were loaded
    (loading restores the saved lr, betas, eps and weight decay). The lr of the step about to run is the
    schedule's, from the new peak lr: the same value the schedule's own step computes."""
    schedule.base_lrs = [cfg.lr] * len(schedule.base_lrs)
    groups = schedule.optimizer.param_groups
    for i, group in enumerate(groups):  # build_optimizer's order: the decayed matrices, then the rest
        group.update(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay if i == 0 else 0.0,
                     initial_lr=cfg.lr)
        group["lr"] = schedule.base_lrs[i] * schedule.lr_lambdas[i](schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in groups]
