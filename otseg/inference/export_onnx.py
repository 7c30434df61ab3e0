"""Export a model to ONNX: the prompted image tower and, with a fixed iteration count, the head.

    otseg export-onnx DIR out.onnx [--size 512] [--iterations 10]

writes ``out.onnx`` (images (B, 3, S, S) → pixels (B, C, S/16, S/16), cls (B, C)) and
``out.head.onnx`` (pixels, cls, text (K, N, C) → decoder and MPS maps (B, K, S/16, S/16) at
the token grid, before upsampling and fusion; any K). The head runs exactly ``--iterations``
Sinkhorn iterations: ONNX has no data-dependent early stop, and the original stopping rule
reads the error on the host. ``onnx`` and ``onnxscript`` are needed (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models.otseg import OTSeg
from ..nn.clip_image import ImageEmbedding
from ..nn.mpsa import fixed_sinkhorn

OPSET = 18
HEAD_ITERATIONS = 10  # default fixed Sinkhorn iterations of the exported head


class _Tower(nn.Module):
    def __init__(self, model: OTSeg) -> None:
        super().__init__()
        self.encoder = model.image_encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.encoder(images)
        return emb.pixels, emb.cls


class _Head(nn.Module):
    def __init__(self, model: OTSeg, attention: str) -> None:
        super().__init__()
        self.model = model
        self.attention = attention

    def forward(self, pixels, cls, text) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.decode(ImageEmbedding(pixels, cls), text, attention=self.attention)
        return maps.decoder, maps.score


def fixed_head_inputs(emb: ImageEmbedding, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head file's inputs for an image embedding and (K, N, C) prompt embeddings."""
    return {"pixels": emb.pixels.float(), "cls": emb.cls.float(), "text": text.float()}


def export_tower(model: OTSeg, path: str | Path, *, size: int | None = None) -> Path:
    """Write the prompted image tower for (B, 3, size, size) images (default: model size)."""
    size = size or model.config.vision.image_size
    images = torch.zeros(2, 3, size, size)  # batch 2: a dynamic axis must not trace as 1
    dynamic = {"images": {0: "batch"}}
    _export(_Tower(model).eval(), (images,), path, ["images"], ["pixels", "cls"], dynamic)
    return Path(path)


def export_head(
    model: OTSeg,
    path: str | Path,
    *,
    iterations: int = HEAD_ITERATIONS,
    size: int | None = None,
    num_classes: int = 2,
    attention: str = "sinkhorn",
) -> Path:
    """Write the head with ``iterations`` fixed Sinkhorn iterations (any batch and K)."""
    cfg = model.config
    grid = (size or cfg.vision.image_size) // cfg.vision.patch_size
    c = cfg.vision.embed_dim
    args = (
        torch.randn(2, c, grid, grid),
        torch.randn(2, c),
        torch.randn(num_classes, cfg.num_prompts, c),
    )
    with fixed_sinkhorn(model.eval(), iterations):
        _export(
            _Head(model, attention).eval(),
            args,
            path,
            ["pixels", "cls", "text"],
            ["decoder", "score"],
            dynamic={"pixels": {0: "batch"}, "cls": {0: "batch"}, "text": {0: "classes"}},
        )
    return Path(path)


def _export(module, args, path, inputs, outputs, dynamic=None) -> None:
    try:
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError:  # a UserError, not SystemExit: the predictor's ONNX backend calls this
        raise UserError(
            "ONNX export needs onnx and onnxscript: pip install -r requirements-dev.txt"
        ) from None
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=_dynamic_shapes(inputs, dynamic),
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def _dynamic_shapes(inputs: Sequence[str], dynamic: dict | None):
    if not dynamic:
        return None
    dim = {name: torch.export.Dim(name) for axes in dynamic.values() for name in axes.values()}
    return tuple(
        {axis: dim[name] for axis, name in dynamic.get(inp, {}).items()} or None for inp in inputs
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="otseg export-onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory or Hub repo id")
    ap.add_argument("out", type=Path, help="output .onnx file (the head goes to OUT.head.onnx)")
    ap.add_argument("--size", type=int, default=None, help="input side (default: model size)")
    ap.add_argument(
        "--iterations", type=int, default=HEAD_ITERATIONS, help="fixed Sinkhorn iterations"
    )
    ap.add_argument("--no-head", action="store_true", help="export the image tower only")
    args = ap.parse_args(argv)
    if args.iterations < 1:
        ap.error("--iterations must be ≥ 1")
    from ..weights.pretrained import from_pretrained

    model = from_pretrained(args.model)
    export_tower(model, args.out, size=args.size)
    print(f"wrote {args.out}")
    if not args.no_head:
        head = args.out.with_suffix(".head.onnx")
        export_head(model, head, iterations=args.iterations, size=args.size)
        print(f"wrote {head} ({args.iterations} fixed Sinkhorn iterations)")


if __name__ == "__main__":
    from otseg.errors import run

    run(main)
