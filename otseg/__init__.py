"""OTSeg: multi-prompt Sinkhorn attention for zero-shot semantic segmentation.

import otseg
result = otseg.segment("photo.jpg", ["cat", "sofa"], model="original:voc-inductive")
result.labels  # (H, W) index into result.class_names
"""

from ._compat import patch_torchvision

patch_torchvision()  # before anything imports open_clip (CPU torch + CUDA torchvision wheels)

from .config import OTSegConfig, tiny_config  # noqa: E402
from .inference.predictor import OTSegPredictor, Prediction, SegmentationModel, segment  # noqa: E402
from .inference.serving import SlideServer  # noqa: E402
from .models import (  # noqa: E402  (registers all)
    OTSeg,
    TrainingFreeOTSeg,
    ZegCLIP,
    ZegCLIPConfig,
    ZegOT,
    ZegOTConfig,
)
from .nn.variants import VARIANTS  # noqa: E402
from .registry import get_preset  # noqa: E402
from .weights.pretrained import from_pretrained  # noqa: E402

__all__ = [
    "OTSeg",
    "OTSegConfig",
    "OTSegPredictor",
    "Prediction",
    "SegmentationModel",
    "SlideServer",
    "TrainingFreeOTSeg",
    "VARIANTS",
    "ZegCLIP",
    "ZegCLIPConfig",
    "ZegOT",
    "ZegOTConfig",
    "from_pretrained",
    "get_preset",
    "segment",
    "tiny_config",
]
__version__ = "0.1.0"
