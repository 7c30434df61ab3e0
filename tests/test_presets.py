"""Every constant of every preset and every released checkpoint, pinned in one table each.

The values are literals taken from the original configs and READMEs (OTSeg at the pinned
commit, ZegOT's paper, ZegCLIP's README), not from the code: a changed ε, calibration, crop,
prompt count, template wording, Drive id, text file or hash fails here by name.
"""

from __future__ import annotations

import pytest

from otseg import get_preset
from otseg.config import PRESETS
from otseg.models.zegot import PRESETS as ZEGOT_PRESETS
from otseg.weights import original

TEMPLATES_6 = (
    "a photo of a {}.",
    "a portrait of a {}.",
    "a part of a {}.",
    "a segment of a {}.",
    "a photo of small {}.",
    "a photo of medium {}.",
)
TEMPLATES_8 = (*TEMPLATES_6, "a photo of large {}.", "a background of a {}.")
IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

# preset: image size, prompt tokens, templates, seen calibration, short side, crop, stride,
# classes, unseen ids
OTSEG = {
    "voc-inductive": (512, 10, TEMPLATES_6, 0.1, 512, 512, 426, 20, (15, 16, 17, 18, 19)),
    "voc-transductive": (512, 10, TEMPLATES_6, 0.0, 512, 512, 426, 20, (15, 16, 17, 18, 19)),
    "voc-fully": (512, 10, TEMPLATES_6, 0.1, 512, 512, 426, 20, ()),
    "context-inductive": (
        480, 10, TEMPLATES_8, 0.1, 520, 480, 80, 59, (19, 33, 48, 14, 7, 24, 6, 54, 31, 0),
    ),
    "context-transductive": (  # tested with 420 crops on the 480 model, as the original
        480, 10, TEMPLATES_8, 0.0, 520, 420, 80, 59, (19, 33, 48, 14, 7, 24, 6, 54, 31, 0),
    ),
    "context-fully": (480, 10, TEMPLATES_8, 0.1, 520, 480, 80, 59, ()),
    "coco-inductive": (
        512, 100, TEMPLATES_8, 0.1, 512, 512, 426, 171,
        (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160),
    ),
    "coco-transductive": (
        512, 100, TEMPLATES_8, 0.0, 512, 512, 426, 171,
        (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160),
    ),
    "coco-fully": (512, 100, TEMPLATES_8, 0.1, 512, 512, 426, 171, ()),
}  # fmt: skip

# preset: image size, short side, crop, stride, frozen-teacher end (fraction of the iterations)
ZEGOT = {
    "zegot-voc-inductive": (512, 512, 512, 426, 0.2),
    "zegot-voc-transductive": (512, 512, 512, 426, 0.2),
    "zegot-context-inductive": (480, 520, 480, 80, 0.5),
    "zegot-context-transductive": (480, 520, 480, 80, 0.5),
    "zegot-coco-inductive": (512, 512, 512, 426, 0.5),
    "zegot-coco-transductive": (512, 512, 512, 426, 0.5),
}

NPY = {  # text file: (bytes, sha256)
    "voc12_otseg.npy": (
        123008, "bfc4c8d37e592f7e77ef01c2e3f78bdee0192e2c66504e97df6d717791384918"
    ),
    "context_otseg.npy": (
        483456, "97761152420cf78dcac02d71a0e2760f94b88803af825d6eb7cf0454fc497cfe"
    ),
    "coco_otseg.npy": (
        2801792, "854bd2d9587ea41a926d3ac72f875985c9e84f48f8d5e7113b9c3286db121eed"
    ),
    "voc12_single.npy": (
        20608, "72d3642e34bc3031fefa2fe31a43ee84b52ebb5f97b85d380f7b0d777b253ea7"
    ),
    "coco_multi.npy": (
        175232, "49190f380a10e8b0df5c006b7f0a9d14aedba5ae7382d43a606d7fb8b39e7798"
    ),
}  # fmt: skip

# setting: Drive id, text file, preset, usable
RELEASED = {
    "original:voc-inductive": (
        "1UjyrFxQ0TTSDiQYse5MxAvHVyhJpqgMA", "voc12_otseg.npy", "voc-inductive", True
    ),
    "original:voc-transductive": (
        "1SPXHxDl7znsOqUi9APnl3qx9BvmUbfny", "voc12_otseg.npy", "voc-transductive", True
    ),
    "original:voc-fully": (  # the README links VOC transductive's file: refused
        "1SPXHxDl7znsOqUi9APnl3qx9BvmUbfny", "voc12_otseg.npy", "voc-fully", False
    ),
    "original:context-inductive": (
        "1ZtNRtUR4fnl1b-oTc44v5HhmXhyx_w4-", "context_otseg.npy", "context-inductive", True
    ),
    "original:context-transductive": (
        "1AZspmBiyjeOzMg5Aq165CcPz3ZLA-_BS", "context_otseg.npy", "context-transductive", True
    ),
    "original:context-fully": (
        "1wTAC7uACPV66VEtlh0qzRMXmNN9mk5gU", "context_otseg.npy", "context-fully", True
    ),
    "original:coco-inductive": (
        "11t3cnRicO9esJrvRjx5O4jL_1v1FDPa8", "coco_otseg.npy", "coco-inductive", True
    ),
    "original:coco-transductive": (
        "1BhxxmuW0R7Pyt2Ty4ERzg9lkKbZQmUY0", "coco_otseg.npy", "coco-transductive", True
    ),
    "original:coco-fully": (
        "1j4dDVz4hWUum68AdQC2n5FDkrstY-zhI", "coco_otseg.npy", "coco-fully", True
    ),
    "zegclip:voc-inductive": (
        "1MqIFntWtTQk3HPiZp8hysI7CQIDTXteS", "voc12_single.npy", "zegclip-voc-inductive", True
    ),
    "zegclip:voc-transductive": (
        "1PsXOd_A9Pww3ftclTDVWKcAvNIOAn6E-", "voc12_single.npy", "zegclip-voc-transductive", True
    ),
    "zegclip:voc-fully": (
        "1oBj2FRV17TAKKrSexg4SUKa4I0egEwaj", "voc12_single.npy", "zegclip-voc-fully", True
    ),
    "zegclip:coco-inductive": (
        "12M6T97o9wyxbJKrR7zLfFMDsGVTiq4WY", "coco_multi.npy", "zegclip-coco-inductive", True
    ),
    "zegclip:coco-transductive": (
        "1S8ia0-0oAUELxQXWqz0OlKoEv68gUuMp", "coco_multi.npy", "zegclip-coco-transductive", True
    ),
    "zegclip:coco-fully": (
        "1DvUpYZa0rtPUBOjsYWwt-TEs6YdvUG0C", "coco_multi.npy", "zegclip-coco-fully", True
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OTSEG))
def test_otseg_preset(name):
    cfg = get_preset(name)
    assert cfg is PRESETS[name]
    image, tokens, templates, calibration, short, crop, stride, classes, unseen = OTSEG[name]
    dataset, setting = name.split("-")
    assert (cfg.dataset, cfg.setting) == (dataset, setting)
    v, h = cfg.vision, cfg.head
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.embed_dim) == (
        image, 16, 768, 12, 12, 512,
    )  # fmt: skip
    assert (v.num_prompt_tokens, v.deep_prompt_layers) == (tokens, 11)
    assert cfg.templates == templates  # wording and order: prompt n is template n
    assert cfg.calibration == calibration  # seen calibration: none when transductive
    assert (cfg.resize_short, cfg.test_crop, cfg.test_stride) == (short, crop, stride)
    assert (len(cfg.class_names), cfg.unseen) == (classes, unseen)
    assert cfg.ensemble_lambda == 0.5
    assert (h.sinkhorn_eps, h.sinkhorn_max_iter, h.sinkhorn_thresh) == (0.05, 100, 1e-6)
    assert (h.num_layers, h.ffn_dim, h.softmax_heads) == (3, 2048, 8)
    assert (cfg.pixel_mean, cfg.pixel_std) == IMAGENET
    assert (cfg.clip_model, cfg.clip_pretrained) == ("ViT-B-16-quickgelu", "openai")


def test_every_otseg_preset_is_in_the_table():
    assert set(PRESETS) == {*OTSEG, "tiny"}


@pytest.mark.parametrize("name", sorted(ZEGOT))
def test_zegot_preset(name):
    cfg = get_preset(name)
    image, short, crop, stride, teacher = ZEGOT[name]
    _, dataset, setting = name.split("-")
    assert (cfg.dataset, cfg.setting, cfg.unseen) == (
        dataset,
        setting,
        OTSEG[f"{dataset}-inductive"][8],
    )
    assert (cfg.vision.image_size, cfg.vision.num_prompt_tokens) == (image, 0)
    assert (cfg.resize_short, cfg.test_crop, cfg.test_stride) == (short, crop, stride)
    assert (cfg.ensemble_lambda, cfg.calibration) == (0.8, 0.0)
    assert (cfg.self_train_start, cfg.frozen_teacher_until) == (0.2, teacher)
    h = cfg.head
    assert (h.num_prompts, h.context_length, h.mpot_layers, h.mpot_last) == (
        4, 8, (8, 9, 10, 11, 12), "identity",
    )  # fmt: skip
    assert (h.sinkhorn_eps, h.sinkhorn_max_iter, h.sinkhorn_thresh) == (0.05, 100, 1e-6)
    assert (h.decoder_channels, h.fpn_stages, h.aspp_dilations) == (64, 4, (1, 3, 6, 9))
    assert (cfg.pixel_mean, cfg.pixel_std) == IMAGENET


def test_every_zegot_preset_is_in_the_table():
    assert set(ZEGOT_PRESETS) == {*ZEGOT, "zegot-tiny"}


@pytest.mark.parametrize("setting", sorted(RELEASED))
def test_released_checkpoint(setting):
    """Each released setting: its Drive id, text file with size and sha256, preset, and
    whether it can be used."""
    prefix, name = setting.split(":")
    entry = original.TABLES[f"{prefix}:"][name]
    drive_id, npy, preset, usable = RELEASED[setting]
    assert (entry.drive_id, entry.embeddings, entry.preset) == (drive_id, npy, preset)
    assert (entry.embeddings_size, entry.embeddings_sha256) == NPY[npy]
    assert (not entry.refused) == usable


def test_every_released_checkpoint_is_in_the_table():
    listed = {f"{prefix}{name}" for prefix, table in original.TABLES.items() for name in table}
    assert listed == set(RELEASED)
