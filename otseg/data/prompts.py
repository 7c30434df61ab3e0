"""Hand-crafted prompt templates: prompt n of a class is template n."""

from __future__ import annotations

TEMPLATES_6 = (
    "a photo of a {}.",
    "a portrait of a {}.",
    "a part of a {}.",
    "a segment of a {}.",
    "a photo of small {}.",
    "a photo of medium {}.",
)
TEMPLATES_8 = (*TEMPLATES_6, "a photo of large {}.", "a background of a {}.")


def fill(templates: tuple[str, ...], name: str) -> list[str]:
    """The N prompt strings of one class name."""
    return [t.format(name) for t in templates]
