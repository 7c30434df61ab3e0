"""Building blocks of the networks: CLIP image and text towers, prompt templates filled into
text, Sinkhorn, MPS, MPSA, decoders, the lambda ensemble and post-processing, losses, CPU glue."""
