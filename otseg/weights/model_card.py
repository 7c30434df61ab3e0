"""Model card (README.md) of a saved model directory."""

from __future__ import annotations

import json
from typing import Any

from .. import registry
from ..data.classes import DATASET_TITLES


def render_model_card(config: Any, card: dict[str, Any], has_text_bank: bool) -> str:
    """Markdown with Hub front matter: what the model is, its vocabulary, metrics, training."""
    kind = registry.type_of(config)
    dataset = DATASET_TITLES.get(config.dataset, config.dataset)
    about = kind.about
    unseen = [config.class_names[i] for i in config.unseen]
    title = card.get("title") or f"{kind.title} — {dataset}, {config.setting}"
    lines = [
        "---",
        "library_name: otseg",
        "pipeline_tag: image-segmentation",
        "license: mit",
        "tags: [zero-shot-segmentation, semantic-segmentation, clip, otseg, optimal-transport]",
        "---",
        "",
        f"# {title}",
        "",
        *([card["description"], ""] if card.get("description") else []),
        about,
        "in the otseg format. Frozen CLIP towers: "
        + (
            f"`{config.clip_model}` / `{config.clip_pretrained}`."
            if config.clip_model
            else "stored in this repo."
        ),
        "",
        "```python",
        "from otseg.inference.predictor import OTSegPredictor",
        "predictor = OTSegPredictor.from_pretrained('<this repo or directory>')",
        "predictor.set_image('photo.jpg'); predictor.set_vocabulary(['cat', 'sofa', 'lamp'])",
        "labels = predictor.predict().labels",
        "```",
        "",
        f"- Training classes ({len(config.class_names)}): {', '.join(config.class_names)}",
        f"- Unseen in training ({len(unseen)}): {', '.join(unseen) if unseen else 'none'}",
        f"- Prompts per class: {config.num_prompts}"
        + (
            " learned"
            if kind.learned_prompts
            else f"; stored prompt embeddings: {'yes' if has_text_bank else 'no'}"
        ),
        f"- Test: short side {config.resize_short}, slide crop {config.test_crop}, stride {config.test_stride}",
    ]
    metrics = card.get("metrics")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.2f} |"
            if isinstance(v, float)
            else f"| {k} | {'n/a' if v is None else v} |"
            for k, v in metrics.items()
            if not isinstance(v, dict | list)
        ]
    reported = card.get("reported")
    if reported:
        lines += ["", "## Reported by the authors (not measured on this copy)", ""]
        lines += [f"Source: {reported['source']}.", ""] if reported.get("source") else []
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in reported.items() if k != "source"]
    for key, value in card.items():
        if key not in ("metrics", "title", "description", "reported"):
            lines += [
                "",
                f"## {key.capitalize()}",
                "",
                "```json",
                json.dumps(value, indent=2, default=str),
                "```",
            ]
    return "\n".join(lines) + "\n"
