"""ZegOT (Kim et al., ICLR 2024 submission): OTSeg's predecessor, built from shared parts."""

from .config import PRESETS, ZegOTConfig, zegot_tiny_config
from .model import ZegOT, ZegOTOutput, build_zegot

__all__ = ["PRESETS", "ZegOT", "ZegOTConfig", "ZegOTOutput", "build_zegot", "zegot_tiny_config"]
