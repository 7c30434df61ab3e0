"""Import-time workarounds for the CPU-only PyTorch build.

Every torchvision wheel on PyPI is a CUDA build. With the CPU build of torch its compiled
library fails to load and ``import torchvision`` (hence ``import open_clip``) dies with
``operator torchvision::nms does not exist``. Defining the two operator schemas first lets the
pure-Python parts of torchvision that open_clip uses import; ``torchvision.ops`` stays
unavailable. Only done when the compiled library really cannot be loaded, because a second
definition would break a working install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_LIBRARIES: list[torch.library.Library] = []  # keep the definitions alive


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to patch
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def patch_torchvision() -> None:
    """Make ``import torchvision`` work when its compiled ops cannot load (idempotent)."""
    if "torchvision" in sys.modules or _LIBRARIES:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already registered by a working install
        return
    except (AttributeError, RuntimeError):
        pass
    if _torchvision_extension_loads():
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)
