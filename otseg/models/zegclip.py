"""ZegCLIP (CVPR 2023), OTSeg's softmax baseline, with its own weights: the same module tree as
OTSeg (prompted CLIP image tower, relationship descriptor, three decoder layers), one text
embedding per class, and its own inference (``attention="zegclip"``) by default.

A ZegCLIP checkpoint loads into OTSeg's modules with no missing or extra key, so
:class:`ZegCLIP` is :class:`~otseg.models.otseg.OTSeg` with ZegCLIP's text side and default:

- text: one embedding per class. Stored names use the authors' file as it is
  (``voc12_single.npy``: "a photo of a {}"; ``coco_multi.npy``: the renormalised mean of 15
  templates); other names are encoded the same way by the CLIP text tower.
- inference: ``predict()`` runs ``attention="zegclip"`` (softmax attention, last layer's map,
  no MPS branch, −0.1 on seen classes unless transductive); ``"sinkhorn"`` and ``"softmax"``
  run OTSeg's head on the same weights. With one prompt per class Sinkhorn's plan has nothing
  to share out (each pixel's mass goes to the one prompt): MPSA averages the values over all
  pixels and the MPS map is the cosine similarity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PRESETS as OTSEG_PRESETS
from ..config import SETTINGS, OTSegConfig, tiny_config
from ..data.prompts import ZEGCLIP_15, ZEGCLIP_SINGLE
from ..nn.clip_image import PromptedViT
from ..nn.clip_text import PromptEmbedder, TextTower
from .otseg import OTSeg


@dataclass(frozen=True)
class ZegCLIPConfig(OTSegConfig):
    """:class:`~otseg.config.OTSegConfig` of a ZegCLIP model: ``templates`` are averaged into
    one prompt per class (a single template is used as it is)."""

    templates: tuple[str, ...] = ZEGCLIP_SINGLE

    @property
    def num_prompts(self) -> int:
        return 1

    @property
    def prompt_labels(self) -> tuple[str, ...]:
        """What the one prompt of a class is ("{}" = the name)."""
        if len(self.templates) == 1:
            return self.templates
        return (f"mean of {len(self.templates)} templates for {{}}",)


def zegclip_config(base: OTSegConfig, templates: tuple[str, ...]) -> ZegCLIPConfig:
    """``base``'s fields (sizes, split, test scale, calibration) with ZegCLIP's templates."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return ZegCLIPConfig(**{**fields, "templates": templates})


# ZegCLIP released VOC and COCO-Stuff models (no PASCAL Context); same configs as OTSeg's.
PRESETS: dict[str, ZegCLIPConfig] = {
    f"zegclip-{dataset}-{setting}": zegclip_config(
        OTSEG_PRESETS[f"{dataset}-{setting}"], ZEGCLIP_SINGLE if dataset == "voc" else ZEGCLIP_15
    )
    for dataset in ("voc", "coco")
    for setting in SETTINGS
}
PRESETS["zegclip-tiny"] = zegclip_config(tiny_config(), ZEGCLIP_15[:3])


class ZegCLIP(OTSeg):
    """A ZegCLIP model: OTSeg's modules, text (K, 1, C), ``attention="zegclip"`` by default."""

    default_attention = "zegclip"


def build_zegclip(
    config: ZegCLIPConfig,
    *,
    clip: nn.Module | None = None,
    tokenizer=None,
    text_bank: dict[str, torch.Tensor] | None = None,
) -> ZegCLIP:
    """Assemble a ZegCLIP model (arguments as :func:`otseg.models.otseg.build_model`;
    ``text_bank`` rows are (1, C))."""
    tower = TextTower(clip, tokenizer) if clip is not None else None
    embedder = PromptEmbedder(config.templates, tower=tower, bank=text_bank, average=True)
    visual = clip.visual if clip is not None else None
    return ZegCLIP(config, PromptedViT(config.vision, visual), embedder, tower)


registry.register(
    registry.ModelType(
        name="zegclip",
        title="ZegCLIP",
        config_class=ZegCLIPConfig,
        build=build_zegclip,
        presets=PRESETS,
        about="Zero-shot semantic segmentation with one CLIP text query per class and softmax "
        "attention (ZegCLIP, CVPR 2023; OTSeg's baseline),",
    )
)
