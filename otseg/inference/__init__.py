"""Inference on images: preprocessing, slide and whole-image passes, the stateful predictor,
batched serving, and the backends that run the image tower (PyTorch, ONNX Runtime)."""
