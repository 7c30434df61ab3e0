"""Which of a user's class names count as *seen* (trained-on) classes of a model.

One rule for the library and the demo: a name is seen when its :func:`match_key` equals the
key of one of the model's seen training classes. Seen names get the model's seen-class
calibration; all other names (unseen training classes, new names) are novel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import UserError

_KEY_DROP = re.compile(r"[\s_\-]+")
MAX_CLASSES = 1000


def check_names(names: Sequence[str]) -> list[str]:
    """The vocabulary as a list, or a UserError saying what is wrong with it (a single string,
    empty, over ``MAX_CLASSES`` names, blank or non-string names, duplicates)."""
    if isinstance(names, str):  # list("cat, dog") would be one name per character
        raise UserError(f"give the class names as a list of strings, not one string: {names!r}")
    names = list(names)
    if not names:
        raise UserError("the vocabulary is empty: give at least one class name")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{len(names)} class names; at most {MAX_CLASSES} are supported")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise UserError(f"class names must be non-empty strings, got {bad[:3]!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"duplicate class names: {dupes[:5]}")
    return names


def match_key(name: str) -> str:
    """Key under which two spellings count as the same class.

    Case-insensitive, ignoring spaces, hyphens and underscores: ``"Dining table"``,
    ``"dining-table"`` and ``"diningtable"`` all give ``"diningtable"``.
    """
    return _KEY_DROP.sub("", name.casefold())


def mark_seen(
    names: Sequence[str], train_names: Sequence[str], seen_ids: Sequence[int]
) -> list[bool]:
    """Whether each name was a seen (trained-on) class of the model.

    Args:
        names: the user's vocabulary, length K.
        train_names: the model's training vocabulary, indexed by class id
            (``config.class_names``).
        seen_ids: ids into ``train_names`` that were seen in training (``config.seen``).

    Returns:
        K booleans: True where ``match_key(name)`` equals the key of a seen training class.
        Names matching only unseen training classes, or no training class, are novel (False).

    Raises:
        ValueError: a seen id outside ``range(len(train_names))``.
    """
    bad = [i for i in seen_ids if not 0 <= i < len(train_names)]
    if bad:
        raise UserError(f"seen ids {bad} out of range for {len(train_names)} training classes")
    seen_keys = {match_key(train_names[i]) for i in seen_ids}
    return [match_key(name) in seen_keys for name in names]


def check_vocabulary(
    names: Sequence[str], config: Any, seen: Sequence[bool] | None = None
) -> tuple[list[str], list[bool]]:
    """The checked names (:func:`check_names`) and, per name, whether it is seen: as given, or
    by default :func:`mark_seen` against ``config.class_names`` and ``config.seen``."""
    names = check_names(names)
    if seen is None:
        return names, mark_seen(names, config.class_names, config.seen)
    if len(seen) != len(names):
        raise UserError(f"seen has {len(seen)} entries for {len(names)} class names")
    return names, list(seen)
