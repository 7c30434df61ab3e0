"""Time the training step of a preset on synthetic crops (for GPU benchmarks such as
``bench/bench_gpu.py``): the same ``train_step`` as a run, one process, no data loading.

    from train.step_timer import time_training_step
    seconds = time_training_step("voc-inductive", batch=4, mixed_precision="bf16")

The frozen CLIP towers are random (same architecture, nothing downloaded): the step time does
not depend on their values. Labels hold a few classes per crop, unseen ones included, so the
transductive presets pseudo-label as in training. ZegOT presets (``zegot-*``) run too; their
transductive schedule changes with the step index (``at_step``): seen classes only, then
pseudo-labels from a frozen copy, then from the model itself.
"""

from __future__ import annotations

import statistics
import time

import torch
from accelerate import Accelerator

from otseg.config import OTSegConfig
from otseg.models.otseg import build_model
from otseg.models.zegot import ZegOTConfig, build_zegot
from otseg.nn.mpsa import fixed_sinkhorn
from otseg.registry import get_preset, model_type
from train.build import freeze_unreached, random_text_bank, use_tf32
from train.engine import StepWindow, train_step
from train.objective import build_objective
from train.optim import build_optimizer, build_scheduler


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict:
    """``batch`` crops (B, 3, S, S) of noise and labels (B, S, S) with 4 vertical class bands
    and an ignored border."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((batch, size, size), 255, dtype=torch.long)
    for b in range(batch):
        ids = torch.randperm(num_classes, generator=g)[:4]
        for j, k in enumerate(ids.tolist()):
            labels[b, 8:-8, 8 + j * (size - 16) // 4 : 8 + (j + 1) * (size - 16) // 4] = k
    return {"image": torch.randn(batch, 3, size, size, generator=g), "label": labels}


def time_training_step(
    preset: str | OTSegConfig | ZegOTConfig = "voc-inductive",
    *,
    batch: int = 4,
    mixed_precision: str = "no",
    steps: int = 10,
    warmup: int = 3,
    sinkhorn_iters: int | None = None,
    tf32: bool = True,
    cpu: bool = False,
    at_step: int = 0,
    iterations: int = 80000,
) -> float:
    """Median seconds of one optimizer step (forward, losses, backward, AdamW) of ``batch``
    crops at the preset's size, after ``warmup`` steps; CUDA is synchronised around each.

    at_step: the optimizer-step index the objective sees at the first step, of a run of
    ``iterations`` steps (a transductive ZegOT's phase depends on it; OTSeg ignores it).
    """
    config = get_preset(preset) if isinstance(preset, str) else preset
    config = config.replace(clip_model=None, clip_pretrained=None)
    torch.manual_seed(0)
    if model_type(config) == "zegot":
        model = build_zegot(config)  # random towers of the preset's sizes
    else:
        model = build_model(config, text_bank=random_text_bank(config, 0))
    freeze_unreached(model)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    use_tf32(accelerator.device, tf32)
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, iterations)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    net = accelerator.unwrap_model(model)
    objective = build_objective(net, iterations)
    data = synthetic_batch(batch, config.vision.image_size, len(config.class_names))
    data = {k: v.to(accelerator.device) for k, v in data.items()}
    model.train()
    window, times = StepWindow(), []
    for i in range(warmup + steps):
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with fixed_sinkhorn(net, sinkhorn_iters):
            train_step(
                accelerator, model, optimizer, scheduler, data, objective, at_step + i, window
            )
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
