"""The models: OTSeg, ZegCLIP, ZegOT and the training-free CLIP mode. Each registers its type in
:mod:`otseg.registry` when imported; importing this package registers them all."""

from .otseg import OTSeg, OTSegOutput, build_model
from .training_free import TrainingFreeOTSeg, build_training_free
from .zegclip import ZegCLIP, ZegCLIPConfig, build_zegclip
from .zegot import ZegOT, ZegOTConfig, build_zegot

__all__ = [
    "OTSeg",
    "OTSegOutput",
    "TrainingFreeOTSeg",
    "ZegCLIP",
    "ZegCLIPConfig",
    "ZegOT",
    "ZegOTConfig",
    "build_model",
    "build_training_free",
    "build_zegclip",
    "build_zegot",
]
