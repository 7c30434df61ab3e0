"""What a training step optimises, per model: the text fed to the forward, the targets (with
pseudo-labels when transductive) and the loss terms.

OTSeg: fixed prompt embeddings, pseudo-labels from the step's own output, focal + dice.
ZegOT: class names (the learned prompts are encoded inside the forward, so distributed runs
sync their gradients), BCE + focal + dice, and its transductive schedule in one run: seen
classes only (seen pixels, seen names) for the first ``self_train_start`` of the iterations,
then all names with pseudo-labels on unseen pixels from a copy of the model frozen at that
point until ``frozen_teacher_until``, then from the model itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from otseg.nn.losses import otseg_losses, pseudo_label, remap_labels
from otseg.registry import model_type


class OTSegObjective:
    """Fixed text, the original's transductive rule (pseudo-labels from the step's output)."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        with torch.no_grad():
            self.text = model.training_text  # (K', N, C), fixed in training

    def forward_text(self, step: int) -> torch.Tensor:
        return self.text

    def targets(self, labels: torch.Tensor, output, step: int) -> torch.Tensor:
        return pseudo_label(remap_labels(labels, self.config), output, self.config)

    def losses(self, output, targets: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        return otseg_losses(output, targets, **kwargs)


class ZegOTObjective:
    """ZegOT's step (see the module docstring). ``model``: the unwrapped ZegOT being trained.

    Registered for checkpointing, so a run resumed inside the frozen-teacher window gets the
    teacher back (its trained weights are the object's state).
    """

    def __init__(self, model: nn.Module, iterations: int) -> None:
        from otseg.models.zegot.losses import zegot_losses

        self.model, self.config = model, model.config
        self._losses = zegot_losses
        cfg = self.config
        self.transductive = cfg.setting == "transductive"
        self.start = round(cfg.self_train_start * iterations) if self.transductive else 0
        self.until = round(cfg.frozen_teacher_until * iterations) if self.transductive else 0
        self.inductive_config = cfg.replace(setting="inductive") if self.transductive else cfg
        self.teacher: nn.Module | None = None

    def phase(self, step: int) -> str:
        """``seen`` (seen pixels and names only), ``frozen`` (pseudo-labels from the copy taken
        at ``start``) or ``self`` (pseudo-labels from the model; also every non-transductive
        step, where no pseudo-labels are made)."""
        if step < self.start:
            return "seen"
        return "frozen" if step < self.until else "self"

    def _config(self, step: int):
        """The config whose vocabulary and split the step trains on (seen-only: inductive)."""
        return self.inductive_config if self.phase(step) == "seen" else self.config

    def forward_text(self, step: int) -> tuple[str, ...]:
        return self._config(step).training_class_names

    def targets(self, labels: torch.Tensor, output, step: int) -> torch.Tensor:
        if self.phase(step) == "frozen":
            teacher = self._teacher()
            with torch.no_grad():  # the frozen image tower is shared: reuse the step's embedding
                output = teacher(output.embedding, teacher.embed_text(self.forward_text(step)))
        elif self.teacher is not None:
            self.teacher = None  # the frozen window is over
        cfg = self._config(step)
        return pseudo_label(remap_labels(labels, cfg), output, cfg)

    def losses(self, output, targets: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        return self._losses(output, targets, **kwargs)

    # -- the frozen teacher ------------------------------------------------------------------
    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            self.teacher = frozen_copy(self.model)
        return self.teacher

    def state_dict(self) -> dict:
        if self.teacher is None:
            return {"teacher": None}
        return {"teacher": {k: v.cpu() for k, v in self.teacher.trained_state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.teacher = None
        if state.get("teacher") is not None:
            self.teacher = frozen_copy(self.model)
            self.teacher.load_state_dict(state["teacher"], strict=False)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, gradient-free copy of a ZegOT's trained parts; the frozen CLIP towers are
    shared with ``model`` (not copied)."""
    shared = (model.image_encoder, model.prompts.tower)
    memo = {id(m): m for m in shared}
    teacher = copy.deepcopy(model, memo)
    teacher.prompts._cache, teacher.prompts._cache_key = {}, None
    modes = [m.training for m in shared]
    teacher.eval().requires_grad_(False)
    for m, mode in zip(shared, modes, strict=True):
        # The shared towers keep the model's mode: eval-mode attention takes another kernel,
        # and a resumed run must compute exactly what the uninterrupted one did.
        m.train(mode)
    return teacher


Objective = OTSegObjective | ZegOTObjective


def build_objective(model: nn.Module, iterations: int) -> Objective:
    """The objective of the (unwrapped) model's type."""
    return (
        ZegOTObjective(model, iterations) if model_type(model) == "zegot" else OTSegObjective(model)
    )
