"""The training step and loop: the objective's text, targets (pseudo-labels when
transductive) and losses, normalised by the mask count of the whole optimizer step, AdamW +
poly schedule, gradient accumulation up to the global batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from otseg.errors import UserError
from otseg.nn.losses import count_masks
from otseg.nn.mpsa import fixed_sinkhorn
from train.build import EpochSampler, set_epoch
from train.checkpoint import TrainState
from train.objective import Objective

logger = get_logger("train")
LOG_EVERY = 10  # the step logs are read from the device at the steps that are multiples of it


class StepWindow:
    """Loss sums and mask counts of the micro-batches of one optimizer step on this process."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.masks: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor], masks: torch.Tensor) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.masks = self.masks + masks
        self.count += 1

    def reduce(self, accelerator: Accelerator, min_masks: float) -> dict[str, torch.Tensor]:
        """One all-reduce: the step's loss components normalised by its total mask count
        (at least ``min_masks``), accuracies averaged over micro-batches, and ``num_masks``;
        no host synchronisation (the micro-batch count is the same on every process)."""
        keys = sorted(self.sums)
        masks = torch.as_tensor(self.masks, dtype=torch.float32, device=accelerator.device)
        total = accelerator.reduce(torch.stack([self.sums[k] for k in keys] + [masks]), "sum")
        micro = self.count * accelerator.num_processes
        norm = total[-1].clamp(min=min_masks)
        out = {k: v / (micro if "acc" in k else norm) for k, v in zip(keys, total, strict=False)}
        out["num_masks"] = norm
        self.sums, self.masks, self.count = {}, 0.0, 0
        return out


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: dict,
    objective: Objective,
    step: int,
    window: StepWindow,
    *,
    min_masks: float = 1.0,
) -> dict[str, torch.Tensor] | None:
    """One micro-batch: forward, losses, backward; the optimizer and schedule advance only
    when this micro-batch completes an accumulation window (``sync_gradients``).

    Focal and dice are summed per micro-batch and divided once per optimizer step by the mask
    count of the whole step (all micro-batches, all processes): the original divides by the
    mean count over its 4 GPUs, which is the same objective, so 1, 2, 4 or 8 processes (with
    accumulation) train identically. The count is clamped at ``min_masks`` (the original
    clamps its mean at 1, i.e. the step's total at 4).

    batch: ``image`` (B, 3, S, S) normalised crops, ``label`` (B, S, S) dataset ids, 255 ignore.
    objective: the model's text, targets and losses (see ``train.objective``); step: optimizer
    steps done (the objective's schedule reads it).
    Returns None inside an accumulation window; at its end the step's loss components
    (``loss``, ``{decode,score}.{loss_mask,loss_dice,acc_seg}``) and ``num_masks`` as 0-d
    tensors on the device (not read back: no host synchronisation) and ``lr`` (the rate this
    step used) as a float.
    """
    logs = None
    with accelerator.accumulate(model):
        output = model(batch["image"], objective.forward_text(step))
        targets = objective.targets(batch["label"], output, step)
        losses = objective.losses(output, targets, num_masks=1.0)  # sums, normalised below
        window.add(losses, count_masks(targets))
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients:
            logs = window.reduce(accelerator, min_masks)
            # the gradients are the mean over processes × micro-batches of the summed losses
            scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, scale / logs["num_masks"])
            logs["lr"] = scheduler.get_last_lr()[0]
        optimizer.step()  # a no-op inside an accumulation window (Accelerate)
        if accelerator.sync_gradients:
            scheduler.step()  # per iteration, whatever the number of processes
        optimizer.zero_grad(set_to_none=True)
    return logs


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    sampler: EpochSampler,
    objective: Objective,
    state: TrainState,
    *,
    iterations: int,
    after_step: Callable[[TrainState], object],
    min_masks: float = 1.0,
    sinkhorn_iters: int | None = None,
) -> TrainState:
    """Run optimizer steps ``state.step + 1 .. iterations``.

    The data position is ``state.micro_step`` batches of this process's loader: the epoch
    (shuffle order and augmentation stream) and the batches of it already seen, which a resumed
    run skips with ``skip_first_batches``. ``after_step(state)`` runs after every optimizer
    step on every process (periodic evaluation and checkpoints are collective). The step
    logs are read from the device (one host synchronisation) at the steps that are multiples
    of ``LOG_EVERY`` and at the end, then logged, each at its own step: a checkpoint at such
    a step leaves nothing unlogged, so a resumed run's log has no gap.
    ``sinkhorn_iters``: run the training forward with that many Sinkhorn iterations and no
    early stop (no host synchronisation); None keeps the model's (the original) rule.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise UserError("the training loader is empty on this process: too few images")
    model.train()
    net = accelerator.unwrap_model(model)
    bar = tqdm(
        total=iterations,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not accelerator.is_local_main_process,
    )
    window, pending = StepWindow(), []
    while state.step < iterations:
        epoch, seen = divmod(state.micro_step, per_epoch)
        set_epoch(loader, sampler, epoch)
        batches = accelerator.skip_first_batches(loader, seen) if seen else loader
        for batch in batches:
            with fixed_sinkhorn(net, sinkhorn_iters):
                logs = train_step(
                    accelerator, model, optimizer, scheduler, batch, objective, state.step,
                    window, min_masks=min_masks,
                )  # fmt: skip
            state.micro_step += 1
            if logs is None:
                continue
            state.step += 1
            bar.update(1)
            pending.append((state.step, logs))
            if state.step % LOG_EVERY == 0 or state.step >= iterations:
                values = log_steps(accelerator, pending)
                pending.clear()
                bar.set_postfix(
                    loss=f"{values['loss']:.3f}",
                    mask=f"{values['decode.loss_mask']:.3f}",
                    dice=f"{values['decode.loss_dice']:.3f}",
                    acc=f"{values['decode.acc_seg']:.1f}",
                    epoch=epoch,
                )
            after_step(state)
            if state.step >= iterations:
                break
    bar.close()
    return state


def log_steps(accelerator: Accelerator, pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Log ``train/*`` of each (step, logs of :func:`train_step`) at its step, reading every
    device value in one transfer; returns the values of the last step."""
    keys = sorted(k for k, v in pending[0][1].items() if isinstance(v, torch.Tensor))
    rows = torch.stack([torch.stack([logs[k] for k in keys]) for _, logs in pending]).tolist()
    for (step, logs), row in zip(pending, rows, strict=True):
        values = {**logs, **dict(zip(keys, row, strict=True))}  # floats (lr) as they are
        accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
    return values
