"""The training step and loop: remap labels, pseudo-label (transductive), focal + dice
on both maps, AdamW + poly schedule, gradient accumulation up to the global batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from otseg.config import OTSegConfig
from otseg.losses import otseg_losses, pseudo_label, remap_labels
from train.build import EpochSampler, set_epoch
from train.checkpoint import TrainState

logger = get_logger("train")


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: dict,
    text: torch.Tensor,
    config: OTSegConfig,
) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, losses, backward; the optimizer and schedule advance only
    when this micro-batch completes an accumulation window (``sync_gradients``).

    batch: ``image`` (B, 3, S, S) normalised crops, ``label`` (B, S, S) dataset ids, 255 ignore.
    text: (K', N, C) training prompt embeddings (seen classes when inductive).
    Returns the detached loss components (``loss``, ``{decode,score}.{loss_mask,loss_dice,acc_seg}``).
    """
    with accelerator.accumulate(model):
        output = model(batch["image"], text)
        targets = pseudo_label(remap_labels(batch["label"], config), output, config)
        losses = otseg_losses(
            output, targets, reduce_num_masks=lambda n: accelerator.reduce(n, "mean")
        )
        accelerator.backward(losses["loss"])
        optimizer.step()  # a no-op inside an accumulation window (Accelerate)
        if accelerator.sync_gradients:
            scheduler.step()  # per iteration, whatever the number of processes
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in losses.items()}


class LossWindow:
    """Averages the loss components of one accumulation window, then across processes."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] / self.count for k in keys])
        values = accelerator.reduce(local, "mean").tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values, strict=True))


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    sampler: EpochSampler,
    text: torch.Tensor,
    config: OTSegConfig,
    state: TrainState,
    *,
    iterations: int,
    save_every: int,
    save: Callable[[TrainState], object],
) -> TrainState:
    """Run optimizer steps ``state.step + 1 .. iterations``.

    The data position is ``state.micro_step`` batches of this process's loader: the epoch
    (shuffle order and augmentation stream) and the batches of it already seen, which a resumed
    run skips with ``skip_first_batches``. ``save(state)`` runs every ``save_every`` steps and
    at the end (on every process: saving is collective).
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the training loader is empty on this process: too few images")
    model.train()
    bar = tqdm(
        total=iterations,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not accelerator.is_local_main_process,
    )
    window = LossWindow()
    while state.step < iterations:
        epoch, seen = divmod(state.micro_step, per_epoch)
        set_epoch(loader, sampler, epoch)
        batches = accelerator.skip_first_batches(loader, seen) if seen else loader
        for batch in batches:
            window.add(train_step(accelerator, model, optimizer, scheduler, batch, text, config))
            state.micro_step += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            logs = window.reduce(accelerator)
            logs["lr"] = scheduler.get_last_lr()[0]
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{logs['loss']:.3f}",
                mask=f"{logs['decode.loss_mask']:.3f}",
                dice=f"{logs['decode.loss_dice']:.3f}",
                acc=f"{logs['decode.acc_seg']:.1f}",
                epoch=epoch,
            )
            if state.step % save_every == 0 or state.step == iterations:
                path = save(state)
                logger.info("step %d: saved %s", state.step, path)
            if state.step >= iterations:
                break
    bar.close()
    return state
