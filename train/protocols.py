"""The original's five cross-dataset evaluations, with their exact geometry.

A cross-dataset evaluation takes the test resize and normalisation from the *target* dataset's
config and the slide window and stride from the cross-dataset config, not from the evaluated
model: coco→voc slides with stride 380 (the COCO model's own is 426), coco→context resizes the
short side to 520 (Context's), context→voc/coco resize to 512 and slide 480/80 even for the
Context transductive model (tested in-domain with 420 windows), and coco→ADE-150 normalises
with CLIP's statistics (the ADE config's) instead of ImageNet's. Every target class counts as
seen (no calibration effect).

    python -m train.evaluate --protocol coco-to-voc --model runs/coco-inductive/model \\
        --data-root data/VOCdevkit/VOC2012
"""

from __future__ import annotations

from dataclasses import dataclass

from otseg.config import IMAGENET_MEAN, IMAGENET_STD, OTSegConfig
from otseg.errors import UserError
from otseg.models.training_free import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class Protocol:
    """One cross-dataset evaluation of the original code."""

    source: str  # dataset the evaluated model was trained on
    target: str  # dataset reader (``otseg.data.datasets.build_dataset``)
    split: str  # evaluated split of the target
    crop: int  # slide window
    stride: int  # slide stride
    resize_short: int  # test short side of the target dataset's pipeline
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # the target config's normalisation
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def apply(self, config: OTSegConfig) -> OTSegConfig:
        """``config`` with this protocol's test geometry and normalisation."""
        return config.replace(
            resize_short=self.resize_short,
            test_crop=self.crop,
            test_stride=self.stride,
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
        )


PROTOCOLS: dict[str, Protocol] = {
    "coco-to-voc": Protocol("coco", "voc", "val", crop=512, stride=380, resize_short=512),
    "coco-to-context": Protocol("coco", "context", "val", crop=512, stride=426, resize_short=520),
    "coco-to-ade": Protocol(
        "coco",
        "ade",
        "validation",
        crop=512,
        stride=426,
        resize_short=512,
        pixel_mean=CLIP_MEAN,
        pixel_std=CLIP_STD,
    ),  # fmt: skip
    "context-to-voc": Protocol("context", "voc", "val", crop=480, stride=80, resize_short=512),
    "context-to-coco": Protocol(
        "context", "coco", "val2017", crop=480, stride=80, resize_short=512
    ),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UserError(
            f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}"
        ) from None
