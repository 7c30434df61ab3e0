"""Training code for OTSeg (depends on ``otseg``; ``otseg`` never imports it)."""
