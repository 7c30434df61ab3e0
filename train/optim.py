"""AdamW over the trainable parameters and the per-iteration poly schedule with warmup.

The original param-wise rules (backbone ×10, head ×10, norm/ln decay ×0) collapse, under mmcv's
first-match rule, to one group: every trainable parameter gets lr 2e-4 and weight decay 0.01,
LayerNorms included (docs/original-behaviour.md). Frozen parameters are left out of the
optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from otseg.errors import UserError

BASE_LR = 2e-4  # effective: config lr 2e-5 × lr_mult 10
WEIGHT_DECAY = 0.01


def build_param_groups(
    model: nn.Module,
    lr: float = BASE_LR,
    weight_decay: float = WEIGHT_DECAY,
    *,
    prompt_lr: float | None = None,
    prompt_weight_decay: float = 0.0,
) -> list[dict]:
    """One group with every parameter that requires grad (names sorted for a stable order);
    with ``prompt_lr``, the model's ``prompt_parameters()`` (ZegOT's learned context vectors)
    form a second group with that learning rate and ``prompt_weight_decay``."""
    prompts = model.prompt_parameters() if prompt_lr is not None else []
    prompts = [p for p in prompts if p.requires_grad]
    ids = {id(p) for p in prompts}
    params = [
        p for _, p in sorted(model.named_parameters()) if p.requires_grad and id(p) not in ids
    ]
    if not params and not prompts:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []
    if prompts:
        groups.append({"params": prompts, "lr": prompt_lr, "weight_decay": prompt_weight_decay})
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float = BASE_LR,
    weight_decay: float = WEIGHT_DECAY,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    prompt_lr: float | None = None,
    prompt_weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW as the original configs (no grad clipping) over the trainable parameters;
    ``prompt_lr`` / ``prompt_weight_decay``: see :func:`build_param_groups`."""
    return torch.optim.AdamW(
        build_param_groups(
            model, lr, weight_decay, prompt_lr=prompt_lr, prompt_weight_decay=prompt_weight_decay
        ),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
    )


def poly_warmup_lr(
    it: int,
    base_lr: float,
    max_iters: int,
    *,
    power: float = 0.9,
    min_lr: float = 1e-6,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
) -> float:
    """The learning rate of 0-based iteration ``it`` (mmcv ``PolyLrUpdaterHook``):
    ``(base − min_lr)·(1 − it/max_iters)^power + min_lr``, times
    ``1 − (1 − it/warmup_iters)·(1 − warmup_ratio)`` while ``it < warmup_iters``."""
    progress = min(it, max_iters) / max_iters
    lr = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


def poly_warmup_lambda(base_lr: float, max_iters: int, **kwargs: float) -> Callable[[int], float]:
    """``LambdaLR`` factor: ``poly_warmup_lr(it, ...) / base_lr`` (the optimizer's lr is base)."""

    def factor(it: int) -> float:
        return poly_warmup_lr(it, base_lr, max_iters, **kwargs) / base_lr

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    max_iters: int,
    **kwargs: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule; call ``scheduler.step()`` after every optimizer step, so the
    ``it``-th step (0-based) runs with ``poly_warmup_lr(it)`` of each group's base lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [poly_warmup_lambda(g["lr"], max_iters, **kwargs) for g in optimizer.param_groups],
    )


def batch_layout(global_batch: int, max_per_device: int, num_processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with per-device × processes × steps = global batch:
    the largest per-device batch ≤ ``max_per_device`` that works (16 on 8 GPUs: 2 × 8 × 1)."""
    for per_device in range(min(max_per_device, global_batch), 0, -1):
        if global_batch % (per_device * num_processes) == 0:
            return per_device, global_batch // (per_device * num_processes)
    counts = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
    raise UserError(
        f"the global batch of {global_batch} images cannot be split evenly over "
        f"{num_processes} processes; launch {', '.join(map(str, counts[:-1]))} or {counts[-1]} "
        f"processes (e.g. restrict the GPUs with CUDA_VISIBLE_DEVICES), or change the recipe "
        f"with --set global_batch=<a multiple of {num_processes}> (no longer the paper's recipe)"
    )


def describe_batch(global_batch: int, per_device_batch: int, num_processes: int) -> str:
    """A log line explaining how the global batch is formed."""
    steps = global_batch // (per_device_batch * num_processes)
    return (
        f"global batch {global_batch} = {per_device_batch} per device × {num_processes} "
        f"process{'es' if num_processes > 1 else ''} × {steps} gradient-accumulation "
        f"step{'s' if steps > 1 else ''} (the original: 4 per GPU × 4 GPUs × 1)"
    )
