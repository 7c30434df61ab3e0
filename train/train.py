"""Train OTSeg (inductive, transductive or fully supervised) with Accelerate.

    accelerate launch -m train.train --config train/configs/voc-inductive \\
        --data-root data/VOCdevkit/VOC2012 --output-dir runs/voc-inductive
    python -m otseg.data.synthetic data/synthetic   # the tiny recipes' data, written once
    python -m train.train --config tiny --data-root data/synthetic --output-dir runs/tiny --cpu

The global batch of the recipe (16) is kept on 1, 2, 4, 8 or 16 processes: the per-device batch
(at most the recipe's) and gradient accumulation are chosen automatically. Checkpoints go to
``<output-dir>/checkpoints`` (resume with ``--resume-from latest``), TensorBoard logs to
``<output-dir>/logs``, the final evaluation to ``<output-dir>/metrics.json``, the exported model
(the otseg format) to ``<output-dir>/model`` and, with ``--eval-every``, the best one to
``<output-dir>/best``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import logging.handlers
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
)

import otseg  # noqa: F401 - patches torchvision before open_clip/timm are imported
from otseg.config import OTSegConfig
from otseg.errors import UserError
from otseg.metrics import format_table
from otseg.registry import model_type
from train.build import (
    build_config,
    build_eval_loader,
    build_train_loader,
    build_training_model,
    check_distributed,
    check_labels,
    describe_model,
    dump_json,
    freeze_unreached,
    init_facts,
    init_source,
    use_tf32,
)
from train.checkpoint import CheckpointManager, TrainState
from train.engine import train_loop
from train.evaluate import evaluate, metrics_summary, write_metrics
from train.export import PUSH_FAILED_EXIT_CODE, export_model, push_later_hint, push_problem
from train.objective import build_objective
from train.optim import batch_layout, build_optimizer, build_scheduler, describe_batch
from train.recipe import Recipe, add_recipe_args, recipe_from_args

logger = get_logger("train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    add_recipe_args(p)
    p.add_argument("--data-root", help="dataset root (overrides the recipe's data_root)")
    p.add_argument("--output-dir", help="run directory (default: <recipe output_dir>/<name>)")
    p.add_argument("--resume-from", help="'latest' or a checkpoint directory")
    p.add_argument(
        "--init-from",
        help="transductive: the inductive model, checkpoint or run directory to start from "
        "(a run directory: its checkpoint of the recipe's init_from_iter)",
    )
    p.add_argument("--max-iters", type=int, help="optimizer steps (overrides iterations)")
    p.add_argument("--checkpoint-every", type=int, help="save every N steps (overrides the recipe)")
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="newest checkpoints kept (0: all); the recipe's keep_steps are always kept",
    )
    p.add_argument("--eval-every", type=int, help="evaluate every N steps, keep the best (hIoU)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: recipe's")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute ViT blocks")
    p.add_argument("--log-with", default="tensorboard", help="Accelerate tracker, or 'none'")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument(
        "--check-all-labels",
        action="store_true",
        help="check the values of every label file at start (default: 100 files per split of a "
        "built-in dataset, every file of a custom one)",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported model")
    p.add_argument("--cpu", action="store_true", help="train on CPU (several processes: gloo)")
    return p.parse_args(argv)


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file with ``--set`` overrides, then the explicit flags."""
    recipe = recipe_from_args(args)
    flags = {
        "data_root": args.data_root,
        "output_dir": args.output_dir,
        "init_from": args.init_from,
        "iterations": args.max_iters,
        "checkpoint_interval": args.checkpoint_every,
        "mixed_precision": args.mixed_precision,
        "eval_every": args.eval_every,
    }
    recipe = dataclasses.replace(recipe, **{k: v for k, v in flags.items() if v is not None})
    recipe.validate()
    return recipe


def build_accelerator(
    recipe: Recipe, args: argparse.Namespace, run_dir: Path
) -> tuple[Accelerator, int]:
    """The Accelerator and the per-device batch: the largest one ≤ the recipe's that forms the
    global batch on the launched processes, the rest by gradient accumulation."""
    cpu = args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU")  # PartialState ignores the env
    state = PartialState(cpu=cpu)
    check_distributed(state.num_processes)
    try:
        per_device, steps = batch_layout(
            recipe.global_batch, recipe.per_device_batch, state.num_processes
        )
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.mixed_precision,
        # with pinned batches, the copy to the GPU does not wait for the GPU to finish
        dataloader_config=DataLoaderConfiguration(
            non_blocking=not cpu and torch.cuda.is_available()
        ),
        # accumulation windows may span epochs: the global batch never shrinks at an epoch end
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=steps, sync_with_dataloader=False
        ),
        log_with=None if args.log_with == "none" else args.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "logs")
        ),
        step_scheduler_with_optimizer=False,  # one schedule step per iteration
    )
    use_tf32(accelerator.device, recipe.tf32)
    return accelerator, per_device


@contextlib.contextmanager
def run_log(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Console logging at once; ``<run_dir>/train.log`` only once the block (the checks of the
    arguments and inputs) succeeds, so a run stopped by bad input leaves no folder behind. The
    ``train`` records of the block are held in memory and written to the file first."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    train_logger = logging.getLogger("train")
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    train_logger.addHandler(held)
    try:
        yield
    finally:
        train_logger.removeHandler(held)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        held.setTarget(handler)
        held.flush()
        train_logger.addHandler(handler)
    held.close()


def resume(
    checkpoints: CheckpointManager, resume_from: str | None, fresh: TrainState
) -> TrainState:
    path = checkpoints.resolve(resume_from)
    if path is None:
        if resume_from:
            logger.info(f"no complete checkpoint in {checkpoints.folder}: starting from scratch")
        return fresh
    state = checkpoints.load(path)
    logger.info(f"resumed from {path} at step {state.step}")
    layout = ("num_processes", "per_device_batch", "accumulation_steps")
    if any(getattr(state, k) != getattr(fresh, k) for k in layout):
        logger.warning("batch layout changed since the checkpoint: resuming, but not bit-exactly")
        state = dataclasses.replace(
            fresh,
            step=state.step,
            micro_step=state.step * fresh.accumulation_steps,
            best_score=state.best_score,
            best_step=state.best_step,
        )
    return state


def make_evaluator(
    accelerator: Accelerator, recipe: Recipe, config: OTSegConfig, run_dir: Path
) -> Callable[[torch.nn.Module, int], dict]:
    """``evaluate(model, step)``: slide evaluation on the validation split, ``metrics.json``
    written, ``eval/*`` scalars logged at ``step``; returns the summary (percent)."""
    loader = None

    def run(model: torch.nn.Module, step: int) -> dict:
        nonlocal loader
        if loader is None:
            loader = accelerator.prepare(
                build_eval_loader(
                    recipe.dataset, recipe.data_root, recipe.val_split, config, recipe.num_workers
                )
            )
        metrics = evaluate(
            accelerator, model, loader, config.class_names, seen=config.seen,
            unseen=config.unseen, crop=config.test_crop, stride=config.test_stride,
        )  # fmt: skip
        summary = metrics_summary(metrics)
        if accelerator.is_main_process:
            logger.info(
                "step %d, evaluation on %s/%s:\n%s",
                step, recipe.dataset, recipe.val_split, format_table(metrics),
            )  # fmt: skip
            write_metrics(metrics, run_dir / "metrics.json")
        accelerator.log({f"eval/{k}": v for k, v in summary.items() if v is not None}, step=step)
        return summary

    return run


def headline(summary: dict) -> float | None:
    """The number the best model is chosen by: hIoU, or mIoU when no class is unseen."""
    return summary.get("hiou") if summary.get("hiou") is not None else summary.get("miou")


def warn_if_push_fails(repo_id: str, export_dir: Path) -> None:
    """Check the token and the Hub before training; a problem is a warning, not an error."""
    problem = push_problem(repo_id)
    if problem:
        logger.warning(
            f"--push-to-hub {repo_id} will fail: {problem}. Training goes on, exports to "
            f"{export_dir} and then exits with status {PUSH_FAILED_EXIT_CODE} if the upload "
            f"fails; {push_later_hint(export_dir, repo_id)}"
        )


class StepHooks:
    """Run after every optimizer step (on every process): the periodic evaluation, which
    exports the best model so far to ``<run>/best``, then the checkpoint when one is due."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        recipe: Recipe,
        run_dir: Path,
        evaluate_at: Callable[[torch.nn.Module, int], dict],
        checkpoints: CheckpointManager,
        facts: dict | None = None,
    ) -> None:
        self.accelerator, self.model, self.recipe = accelerator, model, recipe
        self.run_dir, self.evaluate_at, self.checkpoints = run_dir, evaluate_at, checkpoints
        self.facts = dict(facts or {})

    def card(self, state: TrainState, summary: dict | None) -> dict:
        """Model-card facts: the metrics and the recipe with the run's facts (the resolved
        ``init_from``) and the steps trained."""
        training = self.recipe.to_dict() | self.facts | {"steps": state.step}
        return {"metrics": summary or {}, "training": training}

    def keep_if_best(self, state: TrainState, summary: dict) -> None:
        score = headline(summary)
        if score is not None and (state.best_score is None or score > state.best_score):
            state.best_score, state.best_step = score, state.step
            best = self.run_dir / "best"
            export_model(self.accelerator, self.model, best, card=self.card(state, summary))
            logger.info(f"step {state.step}: best so far ({score:.2f}), exported {best}")

    def __call__(self, state: TrainState) -> None:
        recipe, last = self.recipe, state.step == self.recipe.iterations
        if recipe.eval_every and state.step % recipe.eval_every == 0 and not last:
            self.keep_if_best(state, self.evaluate_at(self.model, state.step))
        if state.step % recipe.checkpoint_interval == 0 or last or state.step in recipe.keep_steps:
            logger.info("step %d: saved %s", state.step, self.checkpoints.save(state))


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train, evaluate and export; returns the evaluation summary (percent) or None. A failed
    ``--push-to-hub`` upload exits with ``PUSH_FAILED_EXIT_CODE`` (3) after the export."""
    args = parse_args(argv)
    recipe = build_recipe(args)
    run_dir = Path(args.output_dir) if args.output_dir else recipe.run_dir
    accelerator, per_device = build_accelerator(recipe, args, run_dir)
    with run_log(accelerator, run_dir):  # checks first: no folder when they fail
        config = build_config(recipe)
        checked = check_labels(
            recipe, evaluate=not args.no_eval or recipe.eval_every > 0,
            all_files=args.check_all_labels,
        )  # fmt: skip
        logger.info(
            "label values checked: "
            + ", ".join(f"{split} {n} of {total} files" for split, (n, total) in checked.items())
        )
        if args.push_to_hub and accelerator.is_main_process:
            warn_if_push_fails(args.push_to_hub, run_dir / "model")
        source = init_source(recipe)
        facts = init_facts(recipe, source)
        if source is not None:
            step = facts["init_from_step"]
            logger.info(
                f"init_from {recipe.init_from}: starting from {facts['init_from_resolved']}"
                + (f" (step {step})" if step is not None else "")
            )
        model = build_training_model(recipe, config, source=source)
        if args.gradient_checkpointing:  # else as built (ZegOT: config.head.text_checkpointing)
            model.set_grad_checkpointing(True)
        unreached = freeze_unreached(model)
        loader = build_train_loader(
            recipe, config, per_device, pin_memory=accelerator.device.type == "cuda"
        )
    sampler = loader.sampler
    optimizer = build_optimizer(
        model, recipe.lr, recipe.weight_decay, recipe.betas, recipe.eps,
        prompt_lr=recipe.prompt_lr,  # ZegOT only (Recipe.validate)
        prompt_weight_decay=recipe.prompt_weight_decay,
    )  # fmt: skip
    scheduler = build_scheduler(
        optimizer, recipe.iterations, power=recipe.power, min_lr=recipe.min_lr,
        warmup_iters=recipe.warmup_iters, warmup_ratio=recipe.warmup_ratio,
    )  # fmt: skip
    n = accelerator.num_processes
    logger.info(
        f"{recipe.name}: {config.setting} on {recipe.dataset} ({len(loader.dataset)} images)"
    )
    logger.info(describe_batch(recipe.global_batch, per_device, n))
    logger.info(f"{describe_model(model)}; mixed precision {recipe.mixed_precision}")
    logger.info(f"{len(unreached)} parameter tensors get no gradient and stay fixed: {unreached}")
    if accelerator.is_main_process:
        dump_json(
            run_dir / "recipe.json",
            recipe.to_dict() | facts | {"model_config": config.to_dict()},
        )
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    accelerator.init_trackers(recipe.name, config={k: str(v) for k, v in recipe.to_dict().items()})
    checkpoints = CheckpointManager(
        accelerator, run_dir / "checkpoints", args.keep_checkpoints or None, recipe.keep_steps
    )
    fresh = TrainState(
        num_processes=n,
        per_device_batch=per_device,
        accumulation_steps=accelerator.gradient_accumulation_steps,
    )
    objective = build_objective(accelerator.unwrap_model(model), recipe.iterations)
    if model_type(config) == "zegot":
        accelerator.register_for_checkpointing(objective)  # its frozen teacher, when taken
    state = resume(checkpoints, args.resume_from, fresh)
    evaluate_at = make_evaluator(accelerator, recipe, config, run_dir)
    hooks = StepHooks(accelerator, model, recipe, run_dir, evaluate_at, checkpoints, facts)
    state = train_loop(
        accelerator, model, optimizer, scheduler, loader, sampler, objective, state,
        iterations=recipe.iterations, after_step=hooks,
        min_masks=max(1.0, recipe.global_batch / 4), sinkhorn_iters=recipe.sinkhorn_iters,
    )  # fmt: skip
    summary = None if args.no_eval else evaluate_at(model, state.step)
    if summary is not None and recipe.eval_every:
        hooks.keep_if_best(state, summary)
    push_failure = export_model(
        accelerator, model, run_dir / "model", card=hooks.card(state, summary),
        push_to_hub=args.push_to_hub,
    )  # fmt: skip
    logger.info(f"exported {run_dir / 'model'}")
    accelerator.end_training()
    if push_failure:  # logged with the command that pushes the export later
        raise SystemExit(PUSH_FAILED_EXIT_CODE)
    return summary


if __name__ == "__main__":
    from otseg.errors import run

    run(main)
