"""The models: OTSeg, ZegOT and the training-free CLIP mode, each registered by type name in
:mod:`otseg.registry` when imported (importing this package registers them all)."""
