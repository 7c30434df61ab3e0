"""Image-tower engines (otseg.inference.engine): equality with PyTorch, the on-disk cache and its
key, the per-machine choice, whole-image inference at varying sizes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from factories import random_photo, save_tiny_clip, tiny_model, tiny_zegot
from otseg.errors import UserError
from otseg.inference import engine
from otseg.inference.engine import (
    CpuInfo,
    OpenVinoTower,
    auto_precision,
    choose_backend,
    engine_key,
    image_tower,
)
from otseg.inference.predictor import OTSegPredictor
from otseg.models.training_free import build_training_free

XEON = CpuInfo(
    "Intel(R) Xeon(R) Processor",
    frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
    "x86_64",
)
EPYC = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}), "x86_64")
OLD_X86 = CpuInfo("some x86", frozenset({"sse4_2", "avx"}), "x86_64")
AVX2_ONLY = CpuInfo("laptop", frozenset({"avx2"}), "x86_64")
GRAVITON = CpuInfo("Neoverse", frozenset({"asimd", "bf16"}), "aarch64")


def everything(_package: str) -> bool:
    return True


def nothing(_package: str) -> bool:
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    clip = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    free = build_training_free(
        f"local-dir:{clip}", None, resize_short=64, test_crop=64, test_stride=48
    )
    return {"otseg": tiny_model().eval(), "zegot": tiny_zegot().eval(), "training-free": free}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OTSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    return tmp_path / "engines"


def max_delta(a, b) -> float:
    return max(
        (getattr(a, f.name).float() - getattr(b, f.name).float()).abs().max().item()
        for f in dataclasses.fields(a)
    )


# -- equality with PyTorch ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["otseg", "zegot", "training-free"])
def test_openvino_fp32_equals_torch_on_windows_and_other_sizes(models, kind, cache):
    model = models[kind]
    tower = OpenVinoTower(model, "fp32")
    crop = model.config.test_crop
    torch.manual_seed(0)
    for shape in [(crop, crop), (crop - 16, crop + 32), (crop + 16, crop)]:  # window, then whole
        x = torch.randn(1, 3, *shape)
        with torch.inference_mode():
            want = model.encode_image(x)
        got = tower(x)
        assert type(got) is type(want)
        assert max_delta(got, want) < 1e-4, (kind, shape)
    assert set(tower.loaded_from_cache) == {(crop, crop), None}  # a fixed and a dynamic model


def test_openvino_bf16_runs_in_bf16_and_stays_close(models, cache):
    model = models["otseg"]
    x = torch.randn(1, 3, 64, 64)
    fp32, bf16 = OpenVinoTower(model, "fp32")(x), OpenVinoTower(model, "bf16")(x)
    with torch.inference_mode():
        want = model.encode_image(x)
    assert max_delta(fp32, want) < 1e-5
    assert 1e-5 < max_delta(bf16, want) < 5e-2  # rounded (so bf16 ran), but close


def test_batches_run_image_by_image(models, cache):
    model = models["zegot"]  # its per-block pixels are (L, B, C, h, w): batch on dim 1
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = model.encode_image(x)
    got = OpenVinoTower(model, "fp32")(x)
    assert got.blocks.shape == want.blocks.shape and max_delta(got, want) < 1e-4


def test_inductor_fp32_equals_torch(models):
    model = models["otseg"]
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = model.encode_image(x)
    got = image_tower(model, "inductor", "fp32")(x)
    assert max_delta(got, want) < 1e-4


# -- the cache on disk ---------------------------------------------------------------------------
def test_second_start_loads_from_cache_and_changed_weights_reconvert(cache, monkeypatch):
    model = tiny_model(seed=3).eval()
    x = torch.randn(1, 3, 64, 64)
    first = OpenVinoTower(model, "fp32")
    out = first(x)
    assert first.loaded_from_cache == {(64, 64): False}
    assert len(list(cache.glob("openvino-*.xml"))) == 1

    exports = []
    real_export = engine.export_tower
    monkeypatch.setattr(
        engine, "export_tower", lambda *a, **k: exports.append(a) or real_export(*a, **k)
    )
    again = OpenVinoTower(model, "fp32")  # a new start: nothing in memory, the file on disk
    assert max_delta(again(x), out) == 0.0
    assert again.loaded_from_cache == {(64, 64): True} and exports == []

    with torch.no_grad():
        model.image_encoder.prompt_embeddings.add_(0.5)  # e.g. another checkpoint's prompts
    changed = OpenVinoTower(model, "fp32")
    result = changed(x)
    assert changed.loaded_from_cache == {(64, 64): False} and len(exports) == 1
    with torch.inference_mode():
        assert max_delta(result, model.encode_image(x)) < 1e-4  # the new weights, not the old
    assert len(list(cache.glob("openvino-*.xml"))) == 2


def test_key_covers_weights_shape_precision_engine_and_settings(models):
    model = models["otseg"]
    base = engine_key(model, (64, 64), "fp32", "openvino-1")
    assert engine_key(model, (64, 64), "fp32", "openvino-1") == base
    others = {
        engine_key(model, (64, 80), "fp32", "openvino-1"),
        engine_key(model, None, "fp32", "openvino-1"),
        engine_key(model, (64, 64), "bf16", "openvino-1"),
        engine_key(model, (64, 64), "fp32", "openvino-2"),
        engine_key(tiny_model(seed=1), (64, 64), "fp32", "openvino-1"),
    }
    assert base not in others and len(others) == 5
    free = models["training-free"]
    maskclip = engine_key(free, (64, 64), "fp32", "openvino-1")
    free.image_encoder.dense = "clearclip"  # a setting that is no weight
    try:
        assert engine_key(free, (64, 64), "fp32", "openvino-1") != maskclip
    finally:
        free.image_encoder.dense = "maskclip"


def test_predictors_of_one_model_share_the_compiled_tower(cache):
    model = tiny_model(seed=4).eval()
    a, b = OTSegPredictor(model, backend="openvino"), OTSegPredictor(model, backend="openvino")
    assert a.tower is b.tower
    with torch.no_grad():
        model.image_encoder.prompt_embeddings.mul_(2)  # weights changed in place
    assert OTSegPredictor(model, backend="openvino").tower is not a.tower


# -- the per-machine choice ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("info", "available", "want"),
    [
        (XEON, everything, "openvino"),
        (EPYC, everything, "openvino"),
        (AVX2_ONLY, everything, "openvino"),
        (XEON, nothing, "torch"),  # openvino not installed
        (OLD_X86, everything, "torch"),  # no AVX2
        (GRAVITON, everything, "torch"),  # ARM: not measured
    ],
)
def test_auto_backend_by_cpu_and_installed_packages(info, available, want, monkeypatch):
    monkeypatch.delenv("OTSEG_BACKEND", raising=False)
    assert choose_backend("auto", info=info, available=available) == want
    assert choose_backend(None, info=info, available=available) == want


def test_auto_backend_keeps_torch_where_no_engine_applies(models, monkeypatch):
    monkeypatch.delenv("OTSEG_BACKEND", raising=False)

    class Remote:  # no image_encoder module (as the demo's model stand-in)
        device = torch.device("cpu")

    pick = dict(info=XEON, available=everything)
    assert choose_backend("auto", device="cuda", **pick) == "torch"
    assert choose_backend("auto", model=Remote(), **pick) == "torch"
    assert choose_backend("auto", model=models["otseg"], **pick) == "openvino"
    assert choose_backend("auto", precision="fp16", **pick) == "torch"


def test_backend_override_by_environment_and_argument(monkeypatch):
    pick = dict(info=XEON, available=everything)
    monkeypatch.setenv("OTSEG_BACKEND", "Inductor")
    assert choose_backend("auto", **pick) == "inductor"
    assert choose_backend("torch", **pick) == "torch"  # the argument wins over the variable
    monkeypatch.setenv("OTSEG_BACKEND", "tensorrt")
    with pytest.raises(UserError, match="OTSEG_BACKEND='tensorrt'"):
        choose_backend("auto", **pick)


def test_explicit_engine_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OTSEG_BACKEND", raising=False)
    with pytest.raises(UserError, match=r"pip install openvino==\d"):
        choose_backend("openvino", info=XEON, available=nothing)
    with pytest.raises(UserError, match="CPU only"):
        choose_backend("openvino", device="cuda", info=XEON, available=everything)
    with pytest.raises(UserError, match="fp32 or bf16"):
        choose_backend("openvino", precision="fp16", info=XEON, available=everything)
    with pytest.raises(UserError, match="backend must be one of"):
        choose_backend("onnx", info=XEON, available=everything)


def test_auto_precision_is_bf16_only_with_native_bf16():
    assert auto_precision("cpu", XEON) == "bf16"  # AMX
    assert auto_precision("cpu", EPYC) == "bf16"  # AVX512-BF16
    assert auto_precision("cpu", AVX2_ONLY) == "fp32"
    assert auto_precision("cuda", XEON) == "fp32"


def test_cpu_info_reads_this_machine():
    info = engine.cpu_info()
    assert info.model and info.machine
    if info.x86_64:
        assert "sse2" in info.flags  # every x86-64 CPU has it: the flags were read


# -- the predictor on the engine ------------------------------------------------------------------
def test_predictor_default_backend_is_the_auto_choice(cache, monkeypatch):
    monkeypatch.delenv("OTSEG_BACKEND", raising=False)
    p = OTSegPredictor(tiny_model())
    assert p.backend == choose_backend("auto", model=p.model)
    p.set_vocabulary(["class0", "class2"])
    p.set_image(random_photo(80, 100))
    result = p.predict()
    assert (result.backend, result.precision) == (p.backend, "fp32")


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_predictor_on_openvino_equals_torch_at_varying_sizes(mode, cache):
    model = tiny_model().eval()
    names = ["class0", "class1", "class2", "class3"]
    ov, pt = (OTSegPredictor(model, backend=b, mode=mode) for b in ("openvino", "torch"))
    for p in (ov, pt):
        p.set_vocabulary(names)
    for h, w in [(80, 100), (64, 150), (120, 70)]:  # whole: three token grids
        results = []
        for p in (ov, pt):
            p.set_image(random_photo(h, w, seed=h))
            results.append(p.predict())
        np.testing.assert_allclose(results[0].probs, results[1].probs, atol=1e-4)
        assert (results[0].labels == results[1].labels).mean() > 0.999
    assert ov.tower.loaded_from_cache.keys() == ({(64, 64)} if mode == "slide" else {None})


def test_predictor_auto_precision(cache, monkeypatch):
    monkeypatch.setattr(engine, "cpu_info", lambda: AVX2_ONLY)
    assert OTSegPredictor(tiny_model(), precision="auto", backend="torch").precision == "fp32"
    monkeypatch.setattr(engine, "cpu_info", lambda: XEON)
    assert OTSegPredictor(tiny_model(), precision="auto", backend="torch").precision == "bf16"
