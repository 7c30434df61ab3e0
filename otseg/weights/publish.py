"""Maintainers: convert every available released checkpoint and push each to the Hub: OTSeg's as
``ORG/otseg-<setting>``, ZegCLIP's as ``ORG/zegclip-<setting>``.

    otseg publish ORG [--only coco-transductive zegclip:coco-transductive ...] [--output DIR]
                      [--dry-run]

Each model is written to ``DIR/<repo name>`` (with its model card) and then uploaded; with
``--dry-run`` only the folders are written. A failing setting does not stop the others.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..errors import UserError, fail, run
from .convert import build_original
from .original import TABLES, OriginalModel, get_released


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="otseg publish", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "org", help="Hub user or organisation that receives ORG/otseg-… and ORG/zegclip-…"
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="SETTING",
        help="a subset: OTSeg settings (coco-transductive or original:coco-transductive) and "
        "ZegCLIP ones (zegclip:coco-transductive)",
    )
    p.add_argument("--output", default="published", help="folder for the converted models")
    p.add_argument("--dry-run", action="store_true", help="write the folders, upload nothing")
    p.add_argument("--private", action="store_true", help="create the Hub repos as private")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entries: list[OriginalModel] = []
    try:
        if args.only:
            entries = [get_released(n) for n in args.only]
            refused = [e for e in entries if e.refused]
            if refused:
                fail(f"{refused[0].ref} cannot be used: {refused[0].refused}")
    except UserError as e:
        fail(str(e))
    if not args.only:
        for table in TABLES.values():
            for entry in table.values():
                if entry.refused:
                    print(f"skip {entry.ref}: {entry.refused}")
                else:
                    entries.append(entry)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for entry in entries:
        stem = f"{entry.release.repo_stem}-{entry.name}"
        repo = f"{args.org}/{stem}"
        try:
            with tempfile.TemporaryDirectory(prefix=".otseg-download-", dir=out) as work:
                model, card = build_original(entry, Path(work))
            folder = model.save_pretrained(out / stem, card=card)
            if args.dry_run:
                print(f"{entry.ref}: wrote {folder} (dry run, not pushed to {repo})")
            else:
                print(f"{entry.ref}: {model.push_to_hub(repo, card=card, private=args.private)}")
        except (UserError, OSError) as e:  # CheckpointError included; OSError: Hub uploads too
            print(f"error: {entry.ref}: {e}", file=sys.stderr)
            failed.append(entry.ref)
        model = None  # free the previous model before building the next
    if failed:
        print(f"failed: {', '.join(failed)}; run again with --only {' '.join(failed)}")
        return 2
    return 0


if __name__ == "__main__":
    run(main)
