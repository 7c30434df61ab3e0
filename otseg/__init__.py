"""OTSeg: multi-prompt Sinkhorn attention for zero-shot semantic segmentation."""

from ._compat import patch_torchvision

patch_torchvision()  # before anything imports open_clip (CPU torch + CUDA torchvision wheels)

from .config import OTSegConfig, get_preset, tiny_config  # noqa: E402

__all__ = ["OTSegConfig", "get_preset", "tiny_config"]
__version__ = "0.1.0"
