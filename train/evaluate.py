"""Slide-window evaluation with a confusion matrix gathered across processes.

    python -m train.evaluate --model runs/voc-inductive/model --dataset voc --data-root DIR
    python -m train.evaluate --model org/otseg-coco-inductive --protocol coco-to-context \
        --data-root data/VOCdevkit/VOC2010

A model is evaluated on its own vocabulary (mIoU over seen and unseen classes, hIoU) when the
dataset is the one it was trained on, and on the target dataset's class names otherwise
(cross-dataset: all classes count as seen; the text comes from the model's text tower).
``--protocol`` runs one of the original's five cross-dataset evaluations with its exact
geometry (``train.protocols``); otherwise the window, stride and resize are the model's.
Multi-process: ``accelerate launch -m train.evaluate ...`` shards the images.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

import otseg  # noqa: F401 - patches torchvision before open_clip/timm are imported
from otseg.config import OTSegConfig
from otseg.data.classes import CLASS_NAMES
from otseg.inference.slide import slide_inference
from otseg.metrics import SegMetrics, compute_metrics, format_table, new_confusion, to_json, update
from otseg.models.otseg import OTSeg
from otseg.weights.pretrained import from_pretrained
from train.protocols import PROTOCOLS, get_protocol

logger = get_logger("train")
DEFAULT_SPLITS = {
    "voc": "val",
    "context": "val",
    "coco": "val2017",
    "ade": "validation",
    "custom": "val",
}


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    class_names: Sequence[str],
    *,
    seen: Sequence[int],
    unseen: Sequence[int] = (),
    crop: int,
    stride: int,
) -> SegMetrics:
    """Slide inference on every image of a prepared loader (batch 1), argmax at the original
    size, one confusion matrix per image gathered with ``gather_for_metrics`` (which drops the
    images repeated to even out the shards) and summed.

    class_names: the K evaluated classes (label ids index them). seen: ids that get the seen
    calibration. unseen: ids reported as unseen (mIoU(unseen), hIoU).
    """
    net: OTSeg = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    k = len(class_names)
    text = net.embed_text(list(class_names))
    seen_mask = torch.zeros(k, dtype=torch.bool, device=text.device)
    seen_mask[list(seen)] = True
    total = new_confusion(k, device=text.device)

    def run(window: torch.Tensor) -> torch.Tensor:
        return net(window, text, seen=seen_mask).scores.float()

    for batch in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process):
        label = batch["label"]  # (1, H, W) at the original size
        with accelerator.autocast():
            probs = slide_inference(
                run, batch["image"], crop=crop, stride=stride, out_size=tuple(label.shape[-2:])
            )
        conf = update(new_confusion(k, device=total.device), probs.argmax(1), label, k)
        total += accelerator.gather_for_metrics(conf[None]).sum(0)
    net.train(was_training)
    return compute_metrics(total, class_names, unseen)


def metrics_summary(metrics: SegMetrics) -> dict[str, float | None]:
    """Headline numbers in percent (None where undefined), for logs and the model card."""
    return {k: (None if math.isnan(v) else round(v, 2)) for k, v in metrics.summary().items()}


def write_metrics(metrics: SegMetrics, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(metrics))


def parse_names(value: str) -> tuple[str, ...]:
    """A class-name file (one per line) or a comma-separated list."""
    path = Path(value)
    if path.is_file():
        return tuple(n.strip() for n in path.read_text().splitlines() if n.strip())
    return tuple(n.strip() for n in value.split(",") if n.strip())


def vocabulary(
    config: OTSegConfig, dataset: str, data_root: str, names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int], list[int]]:
    """(class names, seen ids, unseen ids) to evaluate ``config``'s model on ``dataset``."""
    if names is None:
        if dataset == config.dataset:
            names = config.class_names
        elif dataset == "custom":
            names = parse_names(str(Path(data_root) / "classes.txt"))
        else:
            names = CLASS_NAMES[dataset]
    if tuple(names) == config.class_names:  # in-domain: the model's own split
        return names, list(config.seen), list(config.unseen)
    return names, list(range(len(names))), []  # cross-dataset: every class is "seen"


def check_vocabulary(model: OTSeg, names: Sequence[str]) -> None:
    """A clear error when the model cannot embed the evaluated class names."""
    if not hasattr(model, "text"):  # ZegOT: its text tower is always there
        return
    missing = [n for n in names if n not in model.text.bank]
    if missing and not model.text.can_encode:
        raise SystemExit(
            f"this model has no text tower (config.clip_model is None) and stores embeddings only "
            f"for {len(model.text.bank)} training classes; it cannot embed {missing[:5]} "
            f"({len(missing)} missing). Other class names need a model with a CLIP text tower; "
            f"or pass --class-names with names it knows: {', '.join(list(model.text.bank)[:5])}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="otseg model directory or Hub repo id")
    p.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help="an original cross-dataset evaluation: target dataset, split, resize, "
        "normalisation, window and stride as the original (flags below still override)",
    )
    p.add_argument("--dataset", choices=sorted(DEFAULT_SPLITS), help="default: the protocol's")
    p.add_argument("--data-root", required=True)
    p.add_argument(
        "--split", help="default: val (VOC, Context, custom), val2017 (COCO), validation (ADE)"
    )
    p.add_argument("--class-names", help="file (one per line) or comma list; default: dataset's")
    p.add_argument("--crop", type=int, help="slide window (default: the model's test_crop)")
    p.add_argument("--stride", type=int, help="slide stride (default: the model's test_stride)")
    p.add_argument("--resize-short", type=int, help="test short side (default: the model's)")
    p.add_argument("--output", help="metrics JSON path (default: print only)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls (default: TF32)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (multi-process via gloo)")
    p.add_argument(
        "--check-all-labels",
        action="store_true",
        help="check every label file's values first (default: 100 files of a built-in dataset)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> SegMetrics:
    from otseg.data.datasets import check_label_values
    from train.build import LABEL_SAMPLE, build_eval_loader, check_distributed, use_tf32

    args = parse_args(argv)
    protocol = get_protocol(args.protocol) if args.protocol else None
    dataset = args.dataset or (protocol.target if protocol else None)
    if dataset is None:
        raise SystemExit("error: pass --dataset, or --protocol for a cross-dataset evaluation")
    if protocol and dataset != protocol.target:
        raise SystemExit(f"error: --protocol {args.protocol} evaluates on {protocol.target}")
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    check_distributed(accelerator.num_processes)
    use_tf32(accelerator.device, not args.no_tf32)
    model = from_pretrained(args.model).to(accelerator.device)  # OTSeg or ZegOT
    config = protocol.apply(model.config) if protocol else model.config
    if protocol and model.config.dataset != protocol.source:
        logger.warning(
            f"--protocol {args.protocol} evaluates a {protocol.source} model; this one was "
            f"trained on {model.config.dataset}"
        )
    if args.resize_short:
        config = config.replace(resize_short=args.resize_short)
    names = parse_names(args.class_names) if args.class_names else None
    names, seen, unseen = vocabulary(config, dataset, args.data_root, names)
    check_vocabulary(model, names)
    split = args.split or (protocol.split if protocol else DEFAULT_SPLITS[dataset])
    loader = build_eval_loader(dataset, args.data_root, split, config, args.num_workers)
    every = args.check_all_labels or dataset == "custom"
    check_label_values(loader.dataset, None if every else LABEL_SAMPLE)
    loader = accelerator.prepare(loader)
    crop, stride = args.crop or config.test_crop, args.stride or config.test_stride
    logger.info(
        f"{args.model} on {dataset}/{split}: {len(names)} classes, resize {config.resize_short}, "
        f"crop {crop}/{stride}"
    )
    metrics = evaluate(
        accelerator, model, loader, names, seen=seen, unseen=unseen, crop=crop, stride=stride
    )
    if accelerator.is_main_process:
        print(format_table(metrics))
        if args.output:
            write_metrics(metrics, Path(args.output))
            print(f"metrics written to {args.output}")
        else:
            print(json.dumps(metrics_summary(metrics)))
    return metrics


if __name__ == "__main__":
    from otseg.errors import run

    run(main)
