"""Weights in and out: Hub and local save/load, the pretrained mixin, model cards, the tables of
the authors' released checkpoints, download, conversion of original checkpoints, publishing."""
