"""Maintainers: convert every available original setting and push each to ``ORG/otseg-<setting>``.

    otseg publish ORG [--only coco-transductive ...] [--output DIR] [--dry-run]

Each model is written to ``DIR/otseg-<setting>`` (with its model card) and then uploaded; with
``--dry-run`` only the folders are written. A failing setting does not stop the others.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..errors import UserError, fail, run
from .convert import build_original
from .original import ORIGINALS, available, get_original


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="otseg publish", description=__doc__.split("\n\n")[0])
    p.add_argument("org", help="Hub user or organisation that receives ORG/otseg-<setting>")
    p.add_argument("--only", nargs="+", metavar="SETTING", help="a subset of the settings")
    p.add_argument("--output", default="published", help="folder for the converted models")
    p.add_argument("--dry-run", action="store_true", help="write the folders, upload nothing")
    p.add_argument("--private", action="store_true", help="create the Hub repos as private")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = [get_original(n).name for n in args.only] if args.only else available()
    except UserError as e:
        fail(str(e))
    for name, entry in ORIGINALS.items():
        if entry.refused and not args.only:
            print(f"skip {name}: {entry.refused}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        repo = f"{args.org}/otseg-{name}"
        try:
            with tempfile.TemporaryDirectory(prefix=".otseg-download-", dir=out) as work:
                model, card = build_original(ORIGINALS[name], Path(work))
            folder = model.save_pretrained(out / f"otseg-{name}", card=card)
            if args.dry_run:
                print(f"{name}: wrote {folder} (dry run, not pushed to {repo})")
            else:
                print(f"{name}: {model.push_to_hub(repo, card=card, private=args.private)}")
        except (UserError, OSError) as e:  # CheckpointError included; OSError: Hub uploads too
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
        model = None  # free the previous model before building the next
    if failed:
        print(f"failed: {', '.join(failed)}; run again with --only {' '.join(failed)}")
        return 2
    return 0


if __name__ == "__main__":
    run(main)
