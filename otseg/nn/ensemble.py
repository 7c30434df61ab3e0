"""From head maps to window scores: upsampling, λ-fusion of the decoder and MPS maps, and the
seen-class calibration. :class:`PostProcessing` is the one path every model uses for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import UserError


def fuse(decoder_map: torch.Tensor, score_map: torch.Tensor | None, lam: float) -> torch.Tensor:
    """(1 − λ)·D + λ·MPS, both (B, K, H, W); D alone when the MPS branch is off.

    λ = 0.5 is the paper's (hard-coded) balancing factor.
    """
    if score_map is None:
        return decoder_map
    if not 0.0 <= lam <= 1.0:
        raise UserError(f"lam must be in [0, 1], got {lam}")
    return (1.0 - lam) * decoder_map + lam * score_map


def calibrate(
    logits: torch.Tensor, seen: torch.Tensor | None, weight: float, *, inplace: bool = False
) -> torch.Tensor:
    """σ(logits) with ``weight`` subtracted on seen classes.

    Args:
        logits: (B, K, H, W) fused map.
        seen: (K,) bool, True for classes the model was supervised on; None = no calibration.
        inplace: overwrite ``logits`` (inference only: saves two full-size copies).
    Returns:
        (B, K, H, W) calibrated sigmoid scores, not probabilities: the original merges slide
        windows on these values (docs/original-behaviour.md).
    """
    out = torch.sigmoid(logits, out=logits if inplace else None)
    if seen is None or weight == 0.0:
        return out
    shift = (seen.to(device=out.device, dtype=out.dtype) * weight)[None, :, None, None]
    return torch.sub(out, shift, out=out if inplace else None)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B, C, *size), bilinear without corner alignment (as everywhere here)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TokenMaps(Protocol):
    """What :meth:`PostProcessing.postprocess` reads from a model's ``decode`` result."""

    decoder: torch.Tensor  # (B, K, h, w)
    score: torch.Tensor | None  # (B, K, h, w), None with the MPS branch off


@dataclass
class WindowScores:
    """Post-processed maps of B crops. S = the model size, (H, W) = the crop size."""

    decoder_map: torch.Tensor  # (B, K, S, S) decoder map D↑ (raw, before the sigmoid)
    score_map: torch.Tensor | None  # (B, K, S, S) MPS map↑ (raw), None with the branch off
    logits: torch.Tensor  # (B, K, S, S) (1 − λ)·D↑ + λ·MPS↑ (overwritten when in place)
    output: torch.Tensor  # (B, K, S, S) σ(logits) − calibration on seen classes
    scores: torch.Tensor  # (B, K, H, W) ``output`` resized to the crop (same if H = W = S)


class PostProcessing:
    """Mixin for a model with ``config.vision.image_size``, ``config.ensemble_lambda`` and
    ``config.calibration``: the forward pass, the predictor, slide inference and evaluation
    all go through :meth:`postprocess`."""

    config: object

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) → (B, K, S, S), bilinear (the head always outputs the model size S)."""
        s = self.config.vision.image_size
        return resize(x, (s, s))

    def postprocess(
        self,
        maps: TokenMaps,
        *,
        lam: float | None = None,
        seen: torch.Tensor | None = None,
        calibration: float | None = None,
        size: tuple[int, int] | None = None,
        inplace: bool = False,
    ) -> WindowScores:
        """Head maps at the token grid → calibrated sigmoid scores of each crop.

        Upsample both maps to S, fuse them with λ, apply σ and the seen calibration, and resize
        to the crop: 420 crops on a 480 model, as the original tests Context transductive.

        Args:
            maps: ``decode`` output of B crops (``decoder`` and ``score``, (B, K, h, w)).
            lam: weight of the MPS map (default: the config's).
            seen: (K,) bool, classes that get the calibration (None: no class).
            calibration: value subtracted on seen classes (default: the config's).
            size: the crop size (H, W) (None: the model size S).
            inplace: reuse the fused buffer for the sigmoid (inference only).
        """
        cfg = self.config
        decoder_map = self.upsample(maps.decoder.float())
        score_map = None if maps.score is None else self.upsample(maps.score.float())
        logits = fuse(decoder_map, score_map, cfg.ensemble_lambda if lam is None else lam)
        weight = cfg.calibration if calibration is None else calibration
        output = calibrate(logits, seen, weight, inplace=inplace)
        scores = output if size is None else resize(output, size)
        return WindowScores(decoder_map, score_map, logits, output, scores)

    def forward_scores(
        self,
        maps: TokenMaps,
        images: torch.Tensor | object,
        *,
        lam: float | None,
        seen: torch.Tensor | None,
        calibration: float | None,
    ) -> dict[str, torch.Tensor | None]:
        """The :class:`WindowScores` fields of a forward on ``images``: (B, 3, H, W) crops
        (``scores`` at (H, W)) or a cached image embedding (``scores`` at the model size)."""
        size = tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None
        post = self.postprocess(maps, lam=lam, seen=seen, calibration=calibration, size=size)
        return vars(post)
