"""Gradio demo of OTSeg: vocabulary parsing, drawing, inference wiring and layout.

``app`` depends on ``otseg``, never the reverse. ``vocab`` and ``overlay`` are pure functions
that import neither gradio nor the model, so they are tested on synthetic data.
"""
