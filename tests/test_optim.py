"""Optimizer groups, the poly + warmup schedule, batch bookkeeping and recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otseg.config import PRESETS
from train.optim import (
    batch_layout,
    build_optimizer,
    build_scheduler,
    describe_batch,
    poly_warmup_lambda,
    poly_warmup_lr,
)
from train.recipe import CONFIG_DIR, load_recipe, parse_override

BASE = 2e-4


def test_schedule_values():
    assert poly_warmup_lr(0, BASE, 20000) == pytest.approx(BASE * 1e-6, rel=1e-9)
    half = (BASE - 1e-6) * (1 - 750 / 20000) ** 0.9 + 1e-6
    assert poly_warmup_lr(750, BASE, 20000) == pytest.approx(half * (0.5 + 0.5e-6), rel=1e-12)
    at_1500 = (BASE - 1e-6) * (1 - 1500 / 20000) ** 0.9 + 1e-6  # warmup over: poly only
    assert poly_warmup_lr(1500, BASE, 20000) == pytest.approx(at_1500, rel=1e-12)
    assert poly_warmup_lr(1499, BASE, 20000) < at_1500
    assert poly_warmup_lr(20000, BASE, 20000) == pytest.approx(1e-6, rel=1e-12)
    assert poly_warmup_lambda(BASE, 20000)(20000) == pytest.approx(1e-6 / BASE)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)


def test_optimizer_holds_only_trainable_params_with_decay_on_norms():
    model = _Model()
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    ids = {id(p) for p in group["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.frozen.weight) not in ids and id(model.norm.weight) in ids
    assert group["lr"] == BASE and group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_lambdalr_follows_the_schedule_per_step():
    model = _Model()
    opt = build_optimizer(model)
    sched = build_scheduler(opt, max_iters=30, warmup_iters=10)
    for it in range(31):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            poly_warmup_lr(it, BASE, 30, warmup_iters=10), rel=1e-12
        )
        opt.step()
        sched.step()
    assert opt.param_groups[0]["initial_lr"] == BASE


def test_batch_layout_for_any_gpu_count_dividing_16():
    expected = {1: (4, 4), 2: (4, 2), 4: (4, 1), 8: (2, 1), 16: (1, 1)}
    for n, layout in expected.items():
        assert batch_layout(16, 4, n) == layout
        per_device, steps = layout
        assert per_device * n * steps == 16
    assert batch_layout(16, 2, 1) == (2, 8)  # a smaller memory bound: more accumulation
    assert batch_layout(4, 2, 4) == (1, 1)
    for n in (3, 5, 6, 7, 12):
        with pytest.raises(ValueError, match=rf"over {n} processes; launch 1, 2, 4, 8 or 16"):
            batch_layout(16, 4, n)
    line = describe_batch(16, 2, 2)
    assert "16 = 2 per device × 2 processes × 4 gradient-accumulation steps" in line


def test_every_preset_has_a_recipe_matching_the_spec():
    iters = {
        "voc": (20000, 10000, 20000),
        "context": (40000, 20000, 40000),
        "coco": (80000, 40000, 80000),
    }
    for dataset, counts in iters.items():
        for setting, count in zip(("inductive", "transductive", "fully"), counts, strict=True):
            r = load_recipe(f"{dataset}-{setting}")
            assert r.preset in PRESETS and r.dataset == dataset and r.iterations == count
            assert r.crop_size == PRESETS[r.preset].vision.image_size
            assert r.img_scale == ((520, 520) if dataset == "context" else (2048, 512))
            assert r.global_batch == 16 and r.lr == 2e-4 and r.warmup_iters == 1500
            assert r.checkpoint_interval == (1000 if count == 10000 else 10000)
            if setting == "transductive":  # its start checkpoint survives the inductive run
                with pytest.raises(ValueError, match="starts from an inductive model"):
                    r.validate()
                start = load_recipe(f"{dataset}-inductive")
                assert start.keep_steps == (r.init_from_iter,) == (count,)
                assert r.init_from_iter % start.checkpoint_interval == 0
    assert {p.stem for p in CONFIG_DIR.glob("*.toml")} >= {f"{k}" for k in PRESETS}


def test_transductive_recipe_requires_init_from():
    r = load_recipe("voc-transductive")
    assert r.init_from_iter == 10000
    with pytest.raises(ValueError, match="--init-from runs/.*checkpoint of step 10000"):
        r.validate()
    load_recipe("voc-transductive", ["init_from=work_dirs/voc-inductive/ckpt"]).validate()
    load_recipe("voc-inductive").validate()
    with pytest.raises(ValueError, match="'tiny' is transductive.*--init-from"):
        load_recipe("tiny", ["setting=transductive"]).validate()  # the setting override too
    load_recipe("zegot-tiny", ["setting=transductive"]).validate()  # ZegOT: one run
    with pytest.raises(ValueError, match="crop_size 256"):
        load_recipe("voc-inductive", ["crop_size=256"]).validate()
    with pytest.raises(ValueError, match="otseg model has no learned prompts"):
        load_recipe("voc-inductive", ["prompt_lr=1e-3"]).validate()
    with pytest.raises(ValueError, match="ZegOT learns its prompts"):
        load_recipe("zegot-tiny", ["text_embeddings=/nowhere.npy"]).validate()


def test_overrides_are_typed():
    r = load_recipe(
        "tiny",
        [
            "lr=1e-4",
            "img_scale=[96, 48]",
            "data_root=/data/x y",
            "per_device_batch=1",
            "betas=0.8,0.9",
            "init_from=none",
        ],
    )
    assert r.lr == 1e-4 and r.img_scale == (96, 48) and r.data_root == "/data/x y"
    assert r.per_device_batch == 1 and r.betas == (0.8, 0.9) and r.init_from is None
    assert parse_override("tf32=false") == ("tf32", False)
    for bad in ("nope=1", "lr", "iterations=1.5", "iterations=0"):
        with pytest.raises(ValueError):
            load_recipe("tiny", [bad])
    with pytest.raises(FileNotFoundError, match="built-in recipes"):
        load_recipe("voc-zeroshot")
