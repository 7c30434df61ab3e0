"""The attention variants of the OTSeg head, each in one sentence, and how a request's λ and MPS
switch are settled for a variant (one rule for the predictor, the server, the command line and
the demo).

A variant that has no MPS score map (``"zegclip"``) has no λ either: asking for λ or for the
MPS map with it is an error, never silently ignored, and the result says ``lam=None``,
``use_mps=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

VARIANTS = {
    "sinkhorn": "OTSeg: Multi-Prompt Sinkhorn Attention (MPSA) in the decoder and the "
    "Multi-Prompt Sinkhorn (MPS) score map, fused with λ.",
    "softmax": "The multi-prompt softmax ablation: OTSeg's multi-prompt pipeline with every "
    "Sinkhorn replaced by softmax (each prompt query runs ZegCLIP's 8-head softmax attention "
    "in the decoder, layer maps averaged over prompts, last layer's map; the MPS map weights "
    "pixels by a softmax over pixels of S/ε divided by N instead of the plan), fused with λ.",
    "zegclip": "ZegCLIP's own inference on these weights: one query per class from the "
    "L2-renormalised mean of its prompt embeddings, ZegCLIP's 8-head softmax attention, the "
    "last layer's map and its seen calibration, no MPS branch (λ and the MPS switch do not "
    "apply).",
}
NO_MPS = frozenset({"zegclip"})  # variants without the MPS score map, hence without λ


@dataclass(frozen=True)
class Knobs:
    """A request's settings, settled: ``lam`` is None and ``use_mps`` False for a variant
    without the MPS branch."""

    attention: str
    lam: float | None
    use_mps: bool

    def as_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "lam": self.lam, "use_mps": self.use_mps}


def default_attention(model: Any) -> str:
    """The variant a model runs when none is asked for (ZegCLIP's models: ``"zegclip"``)."""
    return getattr(model, "default_attention", "sinkhorn")


def describe(model: Any, attention: str) -> str:
    """One sentence on what ``attention`` computes for ``model`` ("" when undocumented)."""
    return getattr(model, "variants", {}).get(attention, "")


def check_lam(lam: Any) -> float:
    """λ as a float in [0, 1]; a one-line UserError otherwise."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(lam, bool) or not 0.0 <= value <= 1.0:
        raise UserError(f"lam must be a number in [0, 1], got {lam!r}")
    return value


def resolve(
    attention: str | None,
    lam: float | None,
    use_mps: bool | None,
    *,
    attentions: Sequence[str],
    default: str = "sinkhorn",
    default_lam: float = 0.5,
) -> Knobs:
    """Settle a request against a model's variants.

    Args:
        attention: the variant, or None for ``default``.
        lam: λ, or None for ``default_lam`` (must stay None for a variant without MPS).
        use_mps: the MPS switch, or None for on (must not be True for a variant without MPS).
        attentions: the variants the model accepts.
    """
    attention = default if attention is None else attention
    if attention not in attentions:
        raise UserError(f"attention must be one of {tuple(attentions)}, got {attention!r}")
    if use_mps is not None and not isinstance(use_mps, bool):
        raise UserError(f"use_mps must be True or False, got {use_mps!r}")
    if attention in NO_MPS:
        if lam is not None:
            raise UserError(
                f"attention={attention!r} has no MPS score map, so λ does not apply; drop "
                f"lam={lam!r} (or pick 'sinkhorn' or 'softmax')"
            )
        if use_mps:
            raise UserError(
                f"attention={attention!r} has no MPS score map; drop use_mps=True (or pick "
                "'sinkhorn' or 'softmax')"
            )
        return Knobs(attention, None, False)
    return Knobs(
        attention,
        check_lam(default_lam if lam is None else lam),
        True if use_mps is None else use_mps,
    )


def resolve_for(model: Any, attention=None, lam=None, use_mps=None) -> Knobs:
    """:func:`resolve` with ``model``'s variants, default variant and default λ."""
    return resolve(
        attention,
        lam,
        use_mps,
        attentions=model.attentions,
        default=default_attention(model),
        default_lam=model.config.ensemble_lambda,
    )
