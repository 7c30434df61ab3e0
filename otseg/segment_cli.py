"""``otseg segment``: photos in, label maps out — files, folders, globs or lists of paths
segmented with one model and one vocabulary, resumable, with progress, on one CPU or on the
processes a launcher starts (``accelerate launch -m otseg segment ...``).

What is written where, and how a run resumes: :mod:`otseg.segment_files`. Here: the options,
the model and its segmenter (:class:`otseg.inference.batch.BatchSegmenter`), the progress bar,
the writer thread, and the split between processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from . import segment_files as files
from .errors import UserError
from .inference.batch import BatchSegmenter, image_loader
from .inference.predictor import MODES, PRECISIONS
from .nn.variants import resolve_for
from .segment_files import Job

WRITES_IN_FLIGHT = 4  # finished images waiting for the writer thread (bounds memory)


def read_names(args: argparse.Namespace) -> list[str] | None:
    """The vocabulary the user gave (None: the model's own class names)."""
    if args.names is not None and args.names_file is not None:
        raise UserError("give --names or --names-file, not both")
    if args.names_file is not None:
        return files.parse_names(Path(args.names_file).read_text(encoding="utf-8"))
    return None if args.names is None else files.parse_names(args.names)


# -- processes ------------------------------------------------------------------------------
class Processes:
    """This process's share of a multi-process run started by a launcher (``torchrun``,
    ``accelerate launch``: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous in the
    environment), or the whole run alone.

    Processes only exchange small Python objects (who does what, the summary), so they meet
    over gloo whatever the device; each process runs its own model on its own device.
    """

    def __init__(self) -> None:
        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._group = False
        if self.count > 1 and not torch.distributed.is_initialized():
            # long timeout: the last gather waits for the slowest process's share
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
            self._group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: Sequence) -> list:
        """This process's contiguous share, the first ``len % count`` shares one longer (as
        Accelerate's ``split_between_processes``)."""
        per, extra = divmod(len(items), self.count)
        start = self.rank * per + min(self.rank, extra)
        return list(items[start : start + per + (1 if self.rank < extra else 0)])

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if self.count == 1:
            return [obj]
        out: list = [None] * self.count
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._group:
            torch.distributed.destroy_process_group()


# -- the run --------------------------------------------------------------------------------
def pick_device(choice: str, processes: Processes) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and processes.count > 1:
        choice = f"cuda:{processes.local_rank}"
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {choice}: this machine has no usable CUDA GPU (try --device cpu)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {choice}: MPS is not available here (try --device cpu)")
    return device


def load_model(ref: str, clip: str, clip_pretrained: str | None):
    """A model by reference (directory, Hub id, ``original:``/``zegclip:`` name), or the
    training-free CLIP model for ``training-free``."""
    if ref == "training-free":
        from .models.training_free import build_training_free

        return build_training_free(
            clip, None if clip_pretrained in ("", "none") else clip_pretrained
        )
    from .weights.pretrained import from_pretrained

    return from_pretrained(ref)


def segment(args: argparse.Namespace) -> int:
    """Run ``otseg segment``; returns the exit code (1 when an image failed)."""
    names = read_names(args)  # bad arguments fail before the model loads
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    jobs = files.collect_inputs(args.inputs, exclude=out)
    processes = Processes()
    try:
        return _run(args, names, out, jobs, processes)
    finally:
        processes.close()


def _run(args, names, out: Path, jobs: list[Job], processes: Processes) -> int:
    device = pick_device(args.device, processes)
    iterations = resolve_iterations(args.iterations, device)
    model = load_model(args.model, args.clip, args.clip_pretrained).to(device).eval()
    segmenter, settings = build_segmenter(args, model, names, iterations)
    kinds = {"overlay_jpeg": not args.no_overlay, "masks": args.masks}
    records, todo = files.plan(jobs, out, settings, **kinds, overwrite=args.overwrite)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        files.sweep_temporary(out)
    processes.barrier()  # nobody writes before every process has planned
    started = time.perf_counter()
    mine = processes.split(todo)
    done = _segment_jobs(segmenter, [jobs[i] for i in mine], out, settings, kinds, args,
                         skipped=len(records) if processes.is_main else 0,
                         show=processes.is_main and not args.quiet)  # fmt: skip
    for part in processes.gather(dict(zip(mine, done, strict=True))):
        records.update(part)
    seconds = time.perf_counter() - started
    ordered = [records[i] for i in range(len(jobs))]
    if processes.is_main:
        files.write_summary(out, ordered, settings["names"])
        print(summary_line(ordered, seconds, processes.count, out), flush=True)
    return 1 if any(r["status"] == "failed" for r in ordered) else 0


def build_segmenter(
    args: argparse.Namespace, model: Any, names: list[str] | None, iterations: int | None
) -> tuple[BatchSegmenter, dict]:
    """The segmenter (the text encoded here, once) and the settings that decide the outputs,
    as every image's JSON records them."""
    if names is None:
        names = list(model.config.class_names)
        if not names:
            raise UserError(f"{args.model} has no class names of its own: give --names")
    variant = resolve_for(model, args.attention, args.lam, False if args.no_mps else None)
    knobs = {**variant.as_dict(), "calibrate_seen": not args.no_calibrate_seen}
    options = {"mode": args.mode, "precision": args.precision, "iterations": iterations}
    backend = {} if args.backend is None else {"backend": args.backend}
    segmenter = BatchSegmenter(model, names, **knobs, **options, **backend,
                               window_batch=args.window_batch, workers=args.workers)  # fmt: skip
    settings = {"model": args.model, "names": names, **knobs, **options,
                "max_side": args.max_side or None, "opacity": args.opacity}  # fmt: skip
    return segmenter, settings


def summary_line(records: list[dict], seconds: float, processes: int, out: Path) -> str:
    """The last line of a run: what was done, how fast, where."""
    count = {s: sum(r["status"] == s for r in records) for s in files.STATUSES}
    line = (
        f"otseg segment: {count['segmented']} segmented, {count['already done']} already done, "
        f"{count['failed']} failed of {len(records)} images in {seconds:.1f} s "
        f"({count['segmented'] / max(seconds, 1e-9):.2f} images/s"
        + (f" on {processes} processes" if processes > 1 else "")
        + f"); outputs in {out}"
    )
    return line + (
        f"; failed images are listed in {out / files.SUMMARY_CSV}" if count["failed"] else ""
    )


def resolve_iterations(choice: str, device: torch.device) -> int | None:
    """``original`` → None (the original stopping rule); ``auto`` → 10 on CUDA, else None."""
    if choice == "original" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return 10
    try:
        value = int(choice)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(
            f"--iterations must be auto, original or a whole number ≥ 1, got {choice!r}"
        )
    return value


def _segment_jobs(
    segmenter: BatchSegmenter, jobs: list[Job], out: Path, settings: dict, kinds: dict,
    args: argparse.Namespace, *, skipped: int, show: bool,
) -> list[dict]:  # fmt: skip
    """Segment this process's jobs, writing in a thread; records in job order."""
    from tqdm.auto import tqdm

    load = image_loader(segmenter.model.config, args.max_side or None)
    records: list[dict] = []
    writes: deque[Future] = deque()
    writer = ThreadPoolExecutor(1, thread_name_prefix="otseg-write")
    bar = tqdm(total=len(jobs) + skipped, initial=skipped, unit="img", desc="segment",
               dynamic_ncols=True, disable=not show, smoothing=0.1)  # fmt: skip
    by_path = {job.path: job for job in jobs}
    failed = 0
    results = segmenter((job.path for job in jobs), load)
    try:
        for result in results:
            job = by_path[result.source]
            if result.error is not None:
                failed += 1
                reason = str(result.error).strip().splitlines()[0]
                bar.write(f"skipped {job.path}: {reason}", file=sys.stderr)
                records.append(files.record(job, "failed", reason=reason))
                bar.update(1)
                bar.set_postfix(failed=failed)
                continue
            records.append(None)
            slot = len(records) - 1
            future = writer.submit(files.write_outputs, job, out, result, settings, **kinds)
            future.add_done_callback(lambda _f: bar.update(1))
            writes.append((slot, future))
            while len(writes) > WRITES_IN_FLIGHT:
                slot_done, f = writes.popleft()
                records[slot_done] = f.result()
        while writes:
            slot_done, f = writes.popleft()
            records[slot_done] = f.result()
    except BaseException:
        results.close()  # stop the loaders
        writer.shutdown(wait=True, cancel_futures=True)  # started writes finish whole
        bar.close()
        raise
    writer.shutdown(wait=True)
    bar.close()
    return records


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``otseg segment``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively), globs, or .txt lists "
                        "of paths")  # fmt: skip
    parser.add_argument("--model", required=True,
                        help="model directory, Hub id, original:<setting>, zegclip:<setting>, "
                        "or training-free (frozen CLIP, see --clip)")  # fmt: skip
    parser.add_argument("--out", "-o", required=True, help="output folder")
    vocab = parser.add_argument_group("vocabulary (default: the model's own class names)")
    vocab.add_argument("--names", help='class names separated by commas: "cat, sofa, floor"')
    vocab.add_argument("--names-file", help="a text file of class names, one per line")
    knobs = parser.add_argument_group("prediction")
    knobs.add_argument(
        "--attention",
        help="the attention variant: sinkhorn, softmax or zegclip "
        "(ZegOT: sinkhorn, softmax, none; default: the model's, zegclip for "
        "ZegCLIP's weights, else sinkhorn)",
    )
    knobs.add_argument(
        "--lam", type=float, help="weight λ of the MPS score map (default: the model's)"
    )
    knobs.add_argument("--no-mps", action="store_true", help="decoder branch only")
    knobs.add_argument("--no-calibrate-seen", action="store_true",
                       help="no seen-class calibration")  # fmt: skip
    knobs.add_argument(
        "--mode",
        choices=MODES,
        default="slide",
        help="slide: overlapping windows, as the paper (default); whole: one pass",
    )
    knobs.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    knobs.add_argument("--backend", help="image-tower backend (default: the library's)")
    knobs.add_argument(
        "--device", default="auto", help="auto (default: GPU if any), cpu, cuda, cuda:N, mps"
    )
    knobs.add_argument("--iterations", default="auto",
                       help="Sinkhorn iterations: original (the original stopping rule, one image at "
                       "a time), N (fixed, windows of several images batched), or auto (default: "
                       "10 on CUDA, original elsewhere)")  # fmt: skip
    knobs.add_argument(
        "--window-batch",
        type=int,
        default=8,
        help="windows per batched forward with fixed iterations (default 8)",
    )
    knobs.add_argument("--max-side", type=int, default=2048,
                       help="segment a copy downscaled to this long side when larger; labels "
                       "come back at full size (default 2048, 0: never)")  # fmt: skip
    knobs.add_argument("--clip", default="ViT-B-16-quickgelu", help="CLIP of --model training-free")
    knobs.add_argument("--clip-pretrained", default="openai",
                       help="its weights tag or file (default openai; none for a local-dir: CLIP)")  # fmt: skip
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--masks", action="store_true", help="also one mask PNG per class present")
    outputs.add_argument("--no-overlay", action="store_true", help="no overlay JPEG")
    outputs.add_argument("--opacity", type=float, default=0.5, help="overlay opacity (default 0.5)")
    outputs.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images that are already done (default: skip them)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=2, help="image loading threads (default 2)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``otseg segment ...`` on its own (the ``otseg`` command dispatches here)."""
    parser = add_arguments(
        argparse.ArgumentParser(prog="otseg segment", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    for flag, value, ok in [
        ("--opacity", args.opacity, 0.0 <= args.opacity <= 1.0),
        ("--lam", args.lam, args.lam is None or 0.0 <= args.lam <= 1.0),
        ("--workers", args.workers, args.workers >= 0),
        ("--window-batch", args.window_batch, args.window_batch >= 1),
        ("--max-side", args.max_side, args.max_side >= 0),
    ]:
        if not ok:
            raise UserError(f"{flag} {value} is out of range (see otseg segment --help)")
    return segment(args)
