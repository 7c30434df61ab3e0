"""Command line and environment settings → loaded model → launched demo.

Settings (flag, then environment variable, then default):
    --model      OTSEG_MODEL      trained model: Hub repo id, local directory, original:<setting>
                                  or zegclip:<setting> (default original:coco-transductive;
                                  "none": training-free CLIP)
    --clip       OTSEG_CLIP       CLIP for the training-free mode ("ViT-B-16-quickgelu")
    --clip-pretrained OTSEG_CLIP_PRETRAINED  its weights tag or file ("openai"; "" for none)
    --precision  OTSEG_PRECISION  "auto" (bf16 on a CPU with AMX or AVX512-BF16, else fp32),
                                  "fp32" or "bf16"
    --backend    OTSEG_BACKEND    what runs the image tower: "auto" (OpenVINO on x86-64 CPUs
                                  where installed, else PyTorch), "torch", "openvino", "inductor"
    --device     OTSEG_DEVICE     "cpu", "cuda" or "mps" (default: cuda when available)
    --host       OTSEG_HOST / GRADIO_SERVER_NAME   ("127.0.0.1")
    --port       OTSEG_PORT / GRADIO_SERVER_PORT   (7860)
    --share      OTSEG_SHARE=1    public gradio.live link
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from app.gpu import PRECISIONS
from app.inference import DEFAULT_MODEL, NO_MODEL, Handlers, LoadedModel, load_model
from app.loading import ModelLoader
from app.ui import CSS, build
from otseg.errors import UserError
from otseg.inference.engine import BACKENDS, auto_precision

QUEUE_MAX_SIZE = 32  # waiting requests beyond this are refused with "queue full"
MAX_FILE_SIZE = "25mb"
LAUNCH = {"css": CSS, "max_file_size": MAX_FILE_SIZE}  # launch() settings of every demo server


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="OTSeg zero-shot segmentation demo. Every flag has an environment variable "
        "(shown in brackets). The page is served at once and shows the model loading."
    )
    p.add_argument(
        "--model",
        default=_env("OTSEG_MODEL", default=DEFAULT_MODEL),
        help="Hub repo id, local otseg directory, original:<setting> (the authors' OTSeg "
        "weights) or zegclip:<setting> (ZegCLIP's), or "
        f"'{NO_MODEL}' for the training-free CLIP mode (default: %(default)s, downloaded once "
        "and cached; if it cannot be had, the page says why and runs training-free) [OTSEG_MODEL]",
    )
    p.add_argument(
        "--clip",
        default=_env("OTSEG_CLIP", default="ViT-B-16-quickgelu"),
        help="open_clip model of the training-free mode (default: %(default)s) [OTSEG_CLIP]",
    )
    p.add_argument(
        "--clip-pretrained",
        default=_env("OTSEG_CLIP_PRETRAINED", default="openai"),
        help="its weights tag or file; '' for none (default: %(default)s) [OTSEG_CLIP_PRETRAINED]",
    )
    p.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default=_env("OTSEG_PRECISION", default="auto"),
        help="auto: bf16 on a CPU with AMX or AVX512-BF16, else fp32 (default: %(default)s) "
        "[OTSEG_PRECISION]",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=_env("OTSEG_BACKEND", default="auto"),
        help="what runs the image tower; auto: OpenVINO on an x86-64 CPU where it is installed, "
        "else PyTorch (default: %(default)s) [OTSEG_BACKEND]",
    )
    p.add_argument(
        "--device",
        default=_env("OTSEG_DEVICE"),
        help="cpu, cuda or mps (default: cuda when available) [OTSEG_DEVICE]",
    )
    p.add_argument(
        "--host",
        default=_env("OTSEG_HOST", "GRADIO_SERVER_NAME", default="127.0.0.1"),
        help="default: %(default)s [OTSEG_HOST, GRADIO_SERVER_NAME]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env("OTSEG_PORT", "GRADIO_SERVER_PORT", default="7860"),  # argparse applies int
        help="default: %(default)s [OTSEG_PORT, GRADIO_SERVER_PORT]",
    )
    p.add_argument(
        "--share",
        action="store_true",
        default=_env("OTSEG_SHARE") == "1",
        help="public gradio.live link [OTSEG_SHARE=1]",
    )
    args = p.parse_args(argv)
    if args.precision not in ("auto", *PRECISIONS):  # choices skip an environment default
        p.error(f"OTSEG_PRECISION={args.precision}: use auto, {' or '.join(PRECISIONS)}")
    if args.backend not in BACKENDS:
        p.error(f"OTSEG_BACKEND={args.backend}: use {', '.join(BACKENDS)}")
    return args


def build_demo(
    loaded: LoadedModel | ModelLoader, reference: str | None = None, warm_examples: bool = False
) -> gr.Blocks:
    """The queued demo around a loaded model (tests call this directly) or a loader that is
    still loading ``reference``. ``warm_examples``: segment the examples in the background once
    the model is there, so clicking one answers from the cache (not on ZeroGPU, where GPU time
    is only granted to requests)."""
    handlers = Handlers(loaded, reference=reference)
    demo = build(handlers)
    if warm_examples and not os.environ.get("SPACES_ZERO_GPU"):
        threading.Thread(target=handlers.warm_examples, name="otseg-examples", daemon=True).start()
    # two inference workers: one per CPU core of a free Space; cheap events set their own limit
    return demo.queue(default_concurrency_limit=2, max_size=QUEUE_MAX_SIZE)


def check_device(device: str | None) -> str:
    """The torch device to run on ("cuda" when available if None); a one-line ``UserError``
    when the machine cannot provide it."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}, {build}); "
            "use --device cpu"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: unknown device; use cpu, cuda or mps")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
    return device


def check_model(model: str | None) -> None:
    """A one-line ``UserError`` when ``model`` is not a usable model reference: a missing local
    path (otseg.weights.hub's rule), a directory without config.json or an unknown ``original:`` or
    ``zegclip:`` setting; a typo stops here instead of starting a demo without its model. Whether a Hub repo
    exists is only known when loading: the demo then shows why it could not load it."""
    if not model:
        return
    from otseg.weights.hub import CONFIG_NAME, locate_model
    from otseg.weights.original import RELEASED_PREFIXES, get_released

    if model.startswith(RELEASED_PREFIXES):
        try:
            get_released(model)  # an unknown or refused setting
        except UserError as e:
            raise UserError(f"--model {model}: {e}") from None
        return
    try:
        where = locate_model(model)
    except UserError as e:  # its message starts with the reference
        raise UserError(f"--model {e}") from None
    if isinstance(where, Path) and not (where / CONFIG_NAME).is_file():
        raise UserError(f"--model {model}: the directory has no {CONFIG_NAME}; is it a model?")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the settings, check them (a ``UserError`` for ``otseg.cli.run`` to print as one
    line), start loading the model and serve the page at once: it shows the loading, and
    requests wait for the model."""
    args = parse_args(argv)
    device = check_device(args.device) if args.device else None  # torch only when asked
    model = None if args.model.strip().lower() == NO_MODEL else args.model
    check_model(model)

    def load() -> LoadedModel:
        where = device or check_device(None)
        precision = auto_precision(where) if args.precision == "auto" else args.precision
        loaded = load_model(
            model,
            clip_model=args.clip,
            clip_pretrained=args.clip_pretrained or None,
            precision=precision,
            device=where,
            backend=args.backend,
        )
        print(loaded.message, flush=True)
        return loaded

    def failed(error: BaseException) -> LoadedModel:
        status = (f"**No model loaded.** Loading failed with an internal error "
                  f"({type(error).__name__}); the server log has the details.")  # fmt: skip
        return LoadedModel(None, "none", status)

    loader = ModelLoader(load, failed).start()
    print(f"Loading {model or 'the training-free CLIP'}; the page is served meanwhile.")
    build_demo(loader, reference=model or args.clip, warm_examples=True).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        **LAUNCH,
    )
