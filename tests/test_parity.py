"""Parity with the original implementation: every fixture directory under $OTSEG_PARITY_DIR
(default ../shared/parity) is converted from its ``official.pth`` and must reproduce the
original's intermediate tensors (1e-5 abs), labels and training losses (1e-5 rel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factories import PARITY_DIR, fixture_config, skip_or_fail
from otseg.inference.engine import choose_backend, image_tower
from otseg.inference.slide import slide_inference
from otseg.nn.losses import otseg_losses, pseudo_label, remap_labels
from otseg.weights.convert import convert_checkpoint

ATOL = 1e-5
FIXTURES = (
    sorted(p.parent for p in PARITY_DIR.glob("*/fixture.json")) if PARITY_DIR.is_dir() else []
)

SLIDE_FIXTURES = [  # fixtures of cross-dataset configs carry no slide output ("slide": null)
    d for d in FIXTURES if json.loads((d / "fixture.json").read_text()).get("slide")
]
TRAIN_FIXTURES = [d for d in FIXTURES if (d / "train_outputs.pt").is_file()]

if not FIXTURES:
    skip_or_fail(
        f"no parity fixtures under {PARITY_DIR} (set OTSEG_PARITY_DIR)", allow_module_level=True
    )


def load_case(d: Path):
    cfg = fixture_config(d)
    model = convert_checkpoint(d / "official.pth", cfg, d / "text_embedding.npy")
    ref = torch.load(d / "outputs.pt", weights_only=True)
    return d, cfg, model, ref


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.name)
def case(request):
    return load_case(request.param)


@pytest.fixture(scope="module", params=SLIDE_FIXTURES, ids=lambda p: p.name)
def slide_case(request):
    return load_case(request.param)


@pytest.fixture(scope="module", params=TRAIN_FIXTURES, ids=lambda p: p.name)
def train_case(request):
    return load_case(request.param)


def seen_mask(cfg) -> torch.Tensor:
    seen = torch.zeros(len(cfg.class_names), dtype=torch.bool)
    seen[list(cfg.seen)] = True
    return seen


DEVIATIONS: dict[str, float] = {}  # largest deviation per compared tensor, for the report


def close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()
    DEVIATIONS[name] = max(diff, DEVIATIONS.get(name, 0.0))
    assert diff <= ATOL, f"{name}: max abs difference {diff:.3g} > {ATOL}"


@pytest.fixture(scope="module", autouse=True)
def report():
    """With ``-s``: print the largest deviation from the original, overall and for the plans."""
    yield
    if DEVIATIONS:
        worst = max(DEVIATIONS, key=DEVIATIONS.get)
        plans = max((v for k, v in DEVIATIONS.items() if k.endswith(".T")), default=None)
        line = f"\nparity: max abs deviation {DEVIATIONS[worst]:.2g} ({worst})"
        print(line + ("" if plans is None else f"; Sinkhorn plans {plans:.2g}"))


def labels_agree(
    name: str, ours: torch.Tensor, ref_labels: torch.Tensor, ref_scores: torch.Tensor
) -> None:
    """Labels must agree wherever the reference's top-2 gap exceeds 1e-4 (near-ties may flip at
    float precision); at least a quarter of the pixels, and 100, must be decided."""
    top2 = ref_scores.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert decided.sum().item() >= max(100, decided.numel() // 4), f"{name}: too few decided"
    wrong = (ours[decided] != ref_labels[decided]).sum().item()
    assert wrong == 0, f"{name}: {wrong} decided pixels differ"


def test_crop_forward_matches_every_intermediate(case):
    _, cfg, model, ref = case
    text = model.embed_text(cfg.class_names)
    assert torch.equal(model.text.bank[cfg.class_names[0]], ref["text_feat"][0])  # fp16 kept
    with torch.no_grad():
        out = model(ref["input"], text, seen=seen_mask(cfg))
    close("backbone.visual", out.embedding.pixels, ref["backbone.visual"])
    close("backbone.cls", out.embedding.cls, ref["backbone.cls"])
    close("head.q", out.queries[0], ref["head.q"])
    for i in range(cfg.head.num_layers):
        close(
            f"layer{i}.tgt",
            out.queries[i + 1].permute(1, 2, 0, 3),
            ref[f"head.decoder.layer{i}.tgt"],
        )
        close(f"layer{i}.attn", out.layer_masks[i].flatten(2), ref[f"head.decoder.layer{i}.attn"])
    for i, tr in enumerate(out.transports):  # 0 = MPS, then the decoder layers
        close(f"sinkhorn.{i}.cost", (1 - tr.similarity).flatten(0, 1), ref[f"sinkhorn.{i}.cost"])
        close(f"sinkhorn.{i}.T", tr.plan.flatten(0, 1), ref[f"sinkhorn.{i}.T"])
    close("head.mps_score_map", out.score_map, ref["head.mps_score_map"])
    close("head.decoder_pred", out.decoder_map, ref["head.decoder_pred"])
    close("head.ensemble_logits", out.logits, ref["head.ensemble_logits"])
    close("head.output", out.output, ref["head.output"])  # at the model size
    assert out.scores.shape[-2:] == ref["input"].shape[-2:]
    close("seg_logit", out.scores, ref["seg_logit"])
    labels_agree("pred", out.scores.argmax(1), ref["pred"], ref["seg_logit"])


def test_slide_inference_matches(slide_case):
    d, cfg, model, ref = slide_case
    text, seen = model.embed_text(cfg.class_names), seen_mask(cfg)
    ori = tuple(json.loads((d / "fixture.json").read_text())["slide"]["ori_shape"])
    with torch.no_grad():
        probs = slide_inference(
            lambda crop: model(crop, text, seen=seen).scores,
            ref["slide.input"],
            crop=cfg.test_crop,
            stride=cfg.test_stride,
            out_size=ori,
        )
    close("slide.probs", probs, ref["slide.probs"])
    labels_agree("slide.pred", probs.argmax(1), ref["slide.pred"], ref["slide.probs"])


def test_slide_inference_matches_on_the_default_backend(slide_case):
    """The same, with the image tower on the backend the predictor picks by default here
    (OpenVINO on an x86-64 CPU where it is installed; see otseg.inference.engine)."""
    d, cfg, model, ref = slide_case
    tower = image_tower(model)
    assert tower.backend == choose_backend("auto", model=model)
    text, seen = model.embed_text(cfg.class_names), seen_mask(cfg)
    ori = tuple(json.loads((d / "fixture.json").read_text())["slide"]["ori_shape"])
    with torch.no_grad():
        probs = slide_inference(
            lambda crop: model(tower(crop), text, seen=seen).scores,
            ref["slide.input"],
            crop=cfg.test_crop,
            stride=cfg.test_stride,
            out_size=ori,
        )
    close("slide.probs", probs, ref["slide.probs"])
    labels_agree("slide.pred", probs.argmax(1), ref["slide.pred"], ref["slide.probs"])


def test_training_losses_match(train_case):
    d, cfg, model, _ = train_case
    train = torch.load(d / "train_outputs.pt", weights_only=True)
    model.train()
    try:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        out = model(train["input"], model.training_text)
        targets = pseudo_label(remap_labels(train["gt"][:, 0], cfg), out, cfg)
        losses = otseg_losses(out, targets)
    finally:
        model.eval()
    assert len(train["losses"]) == 6
    for key, value in train["losses"].items():
        ref = float(value.reshape(()))
        print(f"{d.name} {key}: relative deviation {abs(losses[key].item() - ref) / abs(ref):.1g}")
        assert abs(losses[key].item() - ref) <= 1e-5 * abs(ref), (
            f"{key}: {losses[key].item()} vs {ref}"
        )
    losses["loss"].backward()
    assert model.image_encoder.prompt_embeddings.grad is not None
    assert model.image_encoder.conv1.weight.grad is None  # frozen CLIP gets no gradient
