"""A small mutation runner: break the code on purpose, one plausible bug at a time, and check
that the tests named for each bug fail.

    python bench/mutate.py                       # every mutation in bench/mutations.toml
    python bench/mutate.py -k "^sinkhorn"        # the mutations whose id matches a regex
    python bench/mutate.py --list                # ids and files only, nothing is run
    python bench/mutate.py --check               # each original snippet occurs exactly once

Each mutation in the list file (TOML, ``[[mutation]]`` tables) names a file, an exact snippet
of it (``original``, occurring exactly once), its ``replacement`` and the ``tests`` to run
(pytest node ids or paths). The runner copies the repository's files (tracked and untracked,
not ignored ones) into a temporary folder once, then for each mutation writes the mutated file
there, runs ``pytest -x -q`` on the named tests and puts the file back: the working tree is
never modified. A mutation is *caught* when pytest fails (or exceeds ``--timeout``), and
*survived* when every named test passes. Before the mutations, each distinct test selection
runs once unmutated: a selection that fails without a mutation would "catch" everything, so
it stops the run.

Not run in CI (it takes minutes); the score it prints is quoted in docs/development.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIST = ROOT / "bench" / "mutations.toml"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str = ""


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # "caught" | "survived" | "timeout"
    seconds: float
    failed: list[str] = field(default_factory=list)  # pytest's FAILED/ERROR lines


def read_mutations(path: Path) -> list[Mutation]:
    """The ``[[mutation]]`` tables of a TOML file; ids must be unique."""
    data = tomllib.loads(path.read_text())
    out, seen = [], set()
    for i, entry in enumerate(data.get("mutation", [])):
        try:
            m = Mutation(
                id=entry["id"],
                file=entry["file"],
                original=entry["original"],
                replacement=entry["replacement"],
                tests=tuple(entry["tests"]),
                why=entry.get("why", ""),
            )
        except KeyError as e:
            raise SystemExit(f"{path}: mutation #{i + 1} lacks the key {e}") from None
        if m.id in seen:
            raise SystemExit(f"{path}: duplicate mutation id {m.id!r}")
        if m.original == m.replacement or not m.tests:
            raise SystemExit(f"{path}: mutation {m.id!r} changes nothing or names no tests")
        seen.add(m.id)
        out.append(m)
    return out


def problems(mutations: list[Mutation], root: Path) -> list[str]:
    """Mutations that no longer apply: a missing file, or a snippet found not exactly once."""
    found = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            found.append(f"{m.id}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            found.append(f"{m.id}: the original snippet occurs {count} times in {m.file}")
    return found


def copy_tree(root: Path, target: Path) -> None:
    """The repository's files as git sees them (tracked + untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = root / name
        if src.is_file():
            dst = target / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def run_pytest(tests: tuple[str, ...], cwd: Path, timeout: float) -> tuple[str, float, list[str]]:
    """("passed" | "failed" | "timeout", seconds, FAILED/ERROR lines)."""
    # No bytecode: a mutated file of the same size and mtime second must not load a stale .pyc.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, []
    seconds = time.perf_counter() - start
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if done.returncode == 5:  # no tests collected: a wrong node id must not count as caught
        raise SystemExit(f"no tests collected for {' '.join(tests)}:\n{done.stdout[-2000:]}")
    return ("passed" if done.returncode == 0 else "failed"), seconds, lines


def run_one(m: Mutation, work: Path, timeout: float) -> Outcome:
    path = work / m.file
    source = path.read_text()
    try:
        path.write_text(source.replace(m.original, m.replacement, 1))
        result, seconds, failed = run_pytest(m.tests, work, timeout)
    finally:
        path.write_text(source)  # restored before the next mutation, whatever happened
    status = {"passed": "survived", "failed": "caught", "timeout": "timeout"}[result]
    return Outcome(m, status, seconds, failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", type=Path, default=DEFAULT_LIST, help="the mutation list (TOML)")
    p.add_argument(
        "-k", dest="select", default="", help="only ids matching this regular expression"
    )
    p.add_argument("--list", action="store_true", help="list the mutations and stop")
    p.add_argument("--check", action="store_true", help="check that every mutation applies")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = p.parse_args(argv)

    mutations = [m for m in read_mutations(args.file) if re.search(args.select, m.id)]
    if args.list:
        for m in mutations:
            print(f"{m.id:40s} {m.file}")
        return 0
    bad = problems(mutations, ROOT)
    if bad:
        print("mutations that do not apply to this tree:\n  " + "\n  ".join(bad))
        return 2
    if args.check:
        print(f"all {len(mutations)} mutations apply")
        return 0

    with tempfile.TemporaryDirectory(prefix="otseg-mutate-") as tmp:
        work = Path(tmp)
        copy_tree(ROOT, work)
        for tests in dict.fromkeys(m.tests for m in mutations):  # baselines, once each
            result, seconds, failed = run_pytest(tests, work, args.timeout)
            if result != "passed":
                print(f"baseline {result} without a mutation: {' '.join(tests)}")
                print("\n".join(failed))
                return 2
        outcomes = []
        for i, m in enumerate(mutations, 1):
            o = run_one(m, work, args.timeout)
            outcomes.append(o)
            print(f"[{i:3d}/{len(mutations)}] {o.status:8s} {o.seconds:6.1f}s  {m.id}", flush=True)
            if o.status == "survived" and m.why:
                print(f"          {m.why}")

    caught = sum(o.status != "survived" for o in outcomes)
    survived = [o.mutation.id for o in outcomes if o.status == "survived"]
    score = 100.0 * caught / max(len(outcomes), 1)
    print(f"\nmutation score: {caught}/{len(outcomes)} caught ({score:.1f} %)")
    if survived:
        print("survived: " + ", ".join(survived))
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
