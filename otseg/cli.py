"""The ``otseg`` command: one entry point for the library's command lines.

    otseg convert ...            convert an original checkpoint, or fetch the authors' released one
    otseg publish ORG ...        convert and upload the authors' released checkpoints
    otseg export-onnx ...        export a model's image tower and head to ONNX
    otseg segment IN... -o DIR   segment photos: label maps, overlays, JSON, a run summary

``python -m otseg ...`` is the same. Each subcommand takes its own ``--help``; bad input ends with
one ``error:`` line and exit code 2 (see :func:`otseg.errors.run`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .errors import run

#: subcommand → (module with ``main(argv)``, one line of help). Imported on use, so
#: ``otseg --help`` is instant and one subcommand never pays for another's imports.
COMMANDS = {
    "convert": ("otseg.weights.convert", "convert an original OTSeg checkpoint (or --original)"),
    "publish": ("otseg.weights.publish", "convert and upload the authors' released checkpoints"),
    "export-onnx": ("otseg.inference.export_onnx", "export the image tower and head to ONNX"),
    "segment": ("otseg.segment_cli", "segment photos into label maps, overlays and JSON"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (
        f"usage: otseg COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n'otseg COMMAND --help' for more."
    )


def dispatch(argv: Sequence[str] | None = None) -> object:
    """Run one subcommand with the rest of ``argv``; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise SystemExit(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"otseg {name}"
    return module.main(rest)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``otseg``)."""
    run(lambda: dispatch(argv))


if __name__ == "__main__":
    main()
