"""ZegOT's training objective: which names and pixels reach the loss in each phase of the
transductive schedule, the frozen teacher, and the loss terms."""

from __future__ import annotations

import pytest
import torch

from otseg.losses import IGNORE
from otseg.zegot import build_zegot, zegot_tiny_config
from train.objective import ZegOTObjective, build_objective

SEEN, UNSEEN = (0, 2, 4), (1, 3)


def _model(**changes):
    torch.manual_seed(0)
    cfg = zegot_tiny_config(**{"setting": "transductive", "frozen_teacher_until": 0.5, **changes})
    return build_zegot(cfg).train()


def _labels() -> torch.Tensor:
    labels = torch.arange(5).repeat_interleave(12).reshape(1, 60, 1).expand(2, 60, 64).clone()
    labels = torch.nn.functional.pad(labels, (0, 0, 0, 4), value=IGNORE)  # (2, 64, 64)
    return labels


def test_phases_and_names_of_the_transductive_schedule():
    obj = ZegOTObjective(_model(), iterations=10)
    assert [obj.phase(s) for s in range(7)] == ["seen"] * 2 + ["frozen"] * 3 + ["self"] * 2
    assert obj.forward_text(1) == ("class0", "class2", "class4")  # seen names only
    assert obj.forward_text(2) == tuple(f"class{i}" for i in range(5))


def test_seen_phase_ignores_every_non_seen_pixel():
    model = _model()
    obj = ZegOTObjective(model, iterations=10)
    labels = _labels()
    targets = obj.targets(labels, None, None, step=0)
    for pos, cid in enumerate(SEEN):
        assert (targets[labels == cid] == pos).all()  # seen id → its channel among seen names
    for cid in (*UNSEEN, IGNORE):
        assert (targets[labels == cid] == IGNORE).all()


def test_pseudo_labels_come_from_a_frozen_copy_then_from_the_model():
    model = _model()
    obj = ZegOTObjective(model, iterations=10)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = _labels()
    names = obj.forward_text(2)

    def guess(net) -> torch.Tensor:  # argmax over unseen classes of λY + (1 − λ)Ỹ
        with torch.no_grad():
            out = net(images, net.embed_text(names))
        fused = 0.8 * out.score_map + 0.2 * out.decoder_map
        return torch.tensor(UNSEEN)[fused[:, list(UNSEEN)].argmax(1)]

    expected = guess(model)
    first = obj.targets(labels, images, None, step=2)
    unseen_px = (labels == 1) | (labels == 3)
    assert (first[unseen_px] == expected[unseen_px]).all()
    assert set(first[unseen_px].unique().tolist()) <= set(UNSEEN)
    for cid in SEEN:
        assert (first[labels == cid] == cid).all()  # seen pixels keep their label
    assert (first[labels == IGNORE] == IGNORE).all()  # ignore stays ignored

    snapshot = {k: v.clone() for k, v in obj.teacher.trained_state_dict().items()}
    with torch.no_grad():  # an optimizer step on the model
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    again = obj.targets(labels, images, None, step=4)
    assert torch.equal(again, first)  # the teacher did not move
    for k, v in obj.teacher.trained_state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert obj.teacher.prompts.tower is model.prompts.tower  # frozen towers shared

    restored = ZegOTObjective(model, iterations=10)
    restored.load_state_dict(obj.state_dict())  # a resumed run inside the window
    assert torch.equal(restored.targets(labels, images, None, step=3), first)

    with torch.no_grad():
        out = model(images, model.embed_text(names))
    late = obj.targets(labels, images, out, step=5)  # the model's own output labels now
    assert obj.teacher is None
    assert (late[unseen_px] == guess(model)[unseen_px]).all()
    assert not torch.equal(late, first)


def test_voc_labels_with_the_current_model_from_the_switch():
    obj = ZegOTObjective(_model(frozen_teacher_until=0.2), iterations=10)
    assert [obj.phase(s) for s in (1, 2, 9)] == ["seen", "self", "self"]


def test_inductive_and_fully_never_pseudo_label():
    torch.manual_seed(0)
    model = build_zegot(zegot_tiny_config())
    obj = build_objective(model, 10)
    labels = _labels()
    assert obj.forward_text(5) == ("class0", "class2", "class4")
    targets = obj.targets(labels, None, None, step=5)
    assert (targets[(labels == 1) | (labels == 3)] == IGNORE).all()
    fully = build_objective(build_zegot(zegot_tiny_config(setting="fully", unseen=())), 10)
    assert fully.forward_text(0) == tuple(f"class{i}" for i in range(5))
    assert torch.equal(fully.targets(labels, None, None, step=0), labels)


def test_loss_terms_are_bce_focal_and_dice_on_both_maps():
    model = _model()
    obj = build_objective(model, 10)
    images = torch.randn(1, 3, 64, 64)
    out = model(images, obj.forward_text(0))
    targets = obj.targets(_labels()[:1], images, out, step=0)
    losses = obj.losses(out, targets)
    for m in ("decode", "score"):
        assert {f"{m}.loss_bce", f"{m}.loss_mask", f"{m}.loss_dice"} <= set(losses)
    total = sum(v for k, v in losses.items() if "loss_" in k)
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    assert model.prompts.ctx.grad is not None and model.prompts.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [{"self_train_start": 0.6, "frozen_teacher_until": 0.5}])
def test_schedule_fractions_are_checked(bad):
    with pytest.raises(ValueError, match="self_train_start"):
        zegot_tiny_config(**bad)
