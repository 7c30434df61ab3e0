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


# ZegCLIP (github ZiqinZhou66/ZegCLIP, get_embedding.ipynb): VOC's released models were trained
# on "a photo of a {}" (no full stop), COCO's on the renormalised mean of these 15 templates.
ZEGCLIP_SINGLE = ("a photo of a {}",)
ZEGCLIP_15 = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)
