"""Text box of class names → ordered, validated vocabulary; presets; seen/novel marking.

Names are separated by commas or newlines. Duplicates are dropped case- and
whitespace-insensitively, keeping the first spelling and the user's order (never ``set()``:
the order is the colour order and the label ids).

Markup: a name containing ``<`` or ``>`` is rejected with a message rather than silently
stripped, so what the user typed is exactly what is segmented and shown. Everything that
renders names as HTML still escapes them (``overlay.legend_html``).
"""

from __future__ import annotations

import functools
import re

from otseg.data.classes import CLASS_NAMES
from otseg.errors import UserError

MAX_CLASSES = 200  # each costs N prompts of the text tower (10 classes: ~130 ms, bench_core (d))
MAX_NAME_LENGTH = 60  # characters, after trimming; CLIP's context is 77 tokens per prompt
# CLIP BPE tokens per name: the 77-token context also holds the start/end tokens and the
# template words (OTSeg, ≤ 5) or learned context vectors (ZegOT, 8). Checked here, before the
# text tower runs, because on ZeroGPU an error inside the GPU worker reaches the user only as
# its class name.
MAX_NAME_TOKENS = 60

#: Preset label shown in the UI → dataset key of ``otseg.data.classes``.
PRESETS: dict[str, str] = {
    "VOC-20": "voc",
    "Context-59": "context",
    "COCO-Stuff-171": "coco",
}

BACKGROUND_NOTE = (
    "OTSeg has no background class: every pixel is given the best-matching name in your "
    "list, even when none of them fits. Add a catch-all name such as “background” or "
    "“other” to absorb pixels that match nothing else; leave it out to force every pixel "
    "into one of your classes."
)

_SEPARATORS = re.compile(r"[,\n\r]+")
_WHITESPACE = re.compile(r"\s+")


def _clean(name: str) -> str:
    """Trim and collapse inner whitespace: ``"  tv \\t monitor "`` → ``"tv monitor"``."""
    return _WHITESPACE.sub(" ", name).strip()


def _quoted(name: str, limit: int | None = None) -> str:
    """A class name inside a message: “name”, cut at ``limit`` characters (then “name”…), with
    control characters shown as �."""
    shown = "".join(ch if ch.isprintable() else "\ufffd" for ch in name[:limit])
    return f"“{shown}”" + ("…" if limit is not None and len(name) > limit else "")


def _check_name(name: str) -> None:
    if "<" in name or ">" in name:
        raise UserError(
            f"Class name {_quoted(name)} contains “<” or “>”; markup is not allowed in class names."
        )
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(
            f"Class name {_quoted(name, 20)} is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}."
        )
    if not any(ch.isalnum() for ch in name):
        raise UserError(f"Class name {_quoted(name)} has no letters or digits.")
    tokens = clip_token_count(name)
    if tokens > MAX_NAME_TOKENS:
        raise UserError(
            f"Class name {_quoted(name, 20)} is {tokens} CLIP tokens long; the limit is "
            f"{MAX_NAME_TOKENS} (non-Latin letters take 2–3 tokens each): use a shorter name."
        )
    if any(not ch.isprintable() for ch in name):
        raise UserError(f"Class name {_quoted(name)} contains control characters.")


@functools.cache
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # after otseg's torchvision fix (above)

    return SimpleTokenizer()


def clip_token_count(name: str) -> int:
    """Number of CLIP BPE tokens of ``name`` (without start and end tokens)."""
    return len(_clip_tokenizer().encode(name))


def parse_vocabulary(text: str) -> list[str]:
    """Parse a text box into the class names to segment, in the user's order.

    Args:
        text: names separated by commas and/or newlines.

    Returns:
        Non-empty list of at most ``MAX_CLASSES`` trimmed, unique names (first spelling kept).

    Raises:
        ValueError: empty vocabulary, too many classes, a name too long, a name with no letter
            or digit, or a name containing ``<``/``>``; the message says which and why.
    """
    names: list[str] = []
    seen: set[str] = set()
    for raw in _SEPARATORS.split(text or ""):
        name = _clean(raw)
        if not name:
            continue
        _check_name(name)
        key = name.casefold()
        if key not in seen:
            seen.add(key)
            names.append(name)
    if not names:
        raise UserError("Enter at least one class name (separate names with commas or newlines).")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{len(names)} class names given; the limit is {MAX_CLASSES}.")
    return names


def preset_text(preset: str) -> str:
    """The class names of a preset (UI label or dataset key) as editable ``", "``-joined text."""
    dataset = PRESETS.get(preset, preset)
    if dataset not in CLASS_NAMES:
        raise UserError(
            f"Unknown preset {_quoted(str(preset))}; choose one of {', '.join(PRESETS)}."
        )
    return ", ".join(CLASS_NAMES[dataset])
