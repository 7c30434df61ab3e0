"""The demo end to end through ``gradio_client``: a tiny random trained-format model, the
training-free mode on a tiny random CLIP, and a server with no model at all."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.inference import load_model
from tests.demo_helpers import (
    awkward_images,
    big_jpeg,
    client,
    forged_size_jpeg,
    forged_size_png,
    served,
    tiny_dirs,
    write_photo,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT = ASSETS / "chelsea.jpg"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_dirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained_url(dirs):
    loaded = load_model(str(dirs[1]))
    assert loaded.mode == "trained", loaded.status
    with served(loaded) as url:
        yield url


def segment(c, image, names, attention="sinkhorn", lam=0.5, use_mps=True, opacity=0.5):
    return c.predict(
        handle_file(str(image)), names, attention, lam, use_mps, opacity, api_name="/segment"
    )


def label_map(files: list[str]) -> np.ndarray:
    png = next(f for f in files if f.endswith(".png"))
    return np.array(Image.open(png))


def page_config(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/config", timeout=10) as r:
        return r.read().decode()


def test_segment_rerender_redraw(trained_url):
    c = client(trained_url)
    overlay, legend, files, info = segment(c, CAT, "cat, class0, Class2, background")
    assert [k["name"] for k in info["classes"]] == ["cat", "class0", "Class2", "background"]
    # tiny split: class1 and class3 unseen, so class0 and class2 (any spelling) are seen
    assert [k["seen"] for k in info["classes"]] == [False, True, True, False]
    assert info["image_size"] == list(Image.open(CAT).size)
    assert sum(k["share"] for k in info["classes"]) == pytest.approx(100, abs=0.1)
    assert "badge-seen" in legend and "badge-novel" in legend
    labels = label_map(files)
    assert labels.shape == Image.open(CAT).size[::-1] and labels.max() < 4
    assert Image.open(overlay).size == Image.open(CAT).size
    assert Path(files[0]).name == "chelsea-otseg-4-classes-labels.png"
    assert Path(files[1]).name == "chelsea-otseg-4-classes.json"
    classes_json = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert classes_json["classes"] == info["classes"]

    maps = {}
    for attention in ("sinkhorn", "softmax"):
        for lam in (0.0, 1.0):
            *_, files, info = c.predict(attention, lam, True, 0.5, True, api_name="/rerender")
            assert (info["attention"], info["lam"]) == (attention, lam)
            maps[attention, lam] = label_map(files)
    assert not np.array_equal(maps["sinkhorn", 1.0], maps["softmax", 1.0])
    assert not np.array_equal(maps["sinkhorn", 0.0], maps["sinkhorn", 1.0])
    *_, info = c.predict("sinkhorn", 0.5, False, 0.5, api_name="/rerender")
    assert info["use_mps"] is False

    opaque = c.predict(1.0, api_name="/redraw")
    clear = c.predict(0.0, api_name="/redraw")
    photo = np.asarray(Image.open(CAT).convert("RGB"), dtype=float)
    # JPEG-encoded: opacity 0 is the photo, opacity 1 the flat colour map
    assert np.abs(np.asarray(Image.open(clear), dtype=float) - photo).mean() < 4
    assert np.abs(np.asarray(Image.open(opaque), dtype=float) - photo).mean() > 20


def test_compare_and_prompt_maps(trained_url):
    c = client(trained_url)
    segment(c, CAT, "cat, sofa, background")
    sides, (left, right), note, table, *_ = c.predict(
        handle_file(str(CAT)), "cat, sofa, background", "slide", 1.0, True, 0.5, "loaded",
        "default", "loaded", "zegclip", api_name="/compare",
    )  # fmt: skip
    assert Image.open(left).size == Image.open(right).size == Image.open(CAT).size
    assert "differ" in note and "`sinkhorn`** (λ = 1.00)" in sides and "no MPS map" in sides
    assert [row[0] for row in table["data"]] == ["cat", "sofa", "background"]
    sinkhorn, softmax, note = c.predict("sofa", api_name="/prompt_maps")
    assert Image.open(sinkhorn).size == Image.open(softmax).size
    assert "Sinkhorn" in note and "softmax" in note
    with pytest.raises(AppError, match="Class must be one of the segmented classes"):
        c.predict("dog", api_name="/prompt_maps")
    assert "aeroplane" in c.predict("VOC-20", api_name="/preset")


def test_needs_an_image_first(trained_url):
    c = client(trained_url)
    with pytest.raises(AppError, match="press Segment first"):
        c.predict("softmax", 0.5, True, 0.5, api_name="/rerender")
    for call in (("cat", "/prompt_maps"), (0.5, "/redraw")):
        with pytest.raises(AppError, match=r"^Upload an image and press Segment first\.$"):
            c.predict(*call[:-1], api_name=call[-1])
    with pytest.raises(AppError, match=r"^Upload an image \(or pick an example\) first\.$"):
        c.predict(None, "cat", "slide", 0.5, True, 0.5, "loaded", "default", "loaded",
                  "softmax", api_name="/compare")  # fmt: skip
    with pytest.raises(AppError, match=r"^Press \*\*Compare on this image\*\* first\.$"):
        c.predict("cat", api_name="/compare_maps")
    with pytest.raises(AppError, match="Upload an image"):
        c.predict(None, "cat", "sinkhorn", 0.5, True, 0.5, api_name="/segment")


def test_settings_are_validated_with_one_wording_before_encoding(trained_url, tmp_path):
    c = client(trained_url)
    never_read = tmp_path / "garbage.png"  # a bad setting is reported before the file is read
    never_read.write_text("not an image")
    bad = {
        ("sinkhorn", 1.5, True, 0.5): "λ must be a number from 0 to 1; got “1.5”.",
        ("sinkhorn", "abc", True, 0.5): "λ must be a number from 0 to 1; got “abc”.",
        ("sinkhorn", 0.5, True, -0.1): "Opacity must be a number from 0 to 1; got “-0.1”.",
        (
            "cosine",
            0.5,
            True,
            0.5,
        ): "Attention must be one of sinkhorn, softmax, zegclip; got “cosine”.",
        ("sinkhorn", 0.5, "yes", 0.5): "use_mps must be true or false; got “yes”.",
    }
    for (attention, lam, use_mps, opacity), message in bad.items():
        with pytest.raises(AppError) as segment_error:
            segment(c, never_read, "cat", attention, lam, use_mps, opacity)
        assert str(segment_error.value) == message
    segment(c, CAT, "cat, dog")
    for (attention, lam, use_mps, opacity), message in bad.items():
        with pytest.raises(AppError) as rerender_error:
            c.predict(attention, lam, use_mps, opacity, api_name="/rerender")
        assert str(rerender_error.value) == message
    with pytest.raises(AppError, match="^Opacity must be a number from 0 to 1; got “2”.$"):
        c.predict(2, api_name="/redraw")
    with pytest.raises(AppError, match="^λ must be a number from 0 to 1; got “-1”.$"):
        c.predict(handle_file(str(CAT)), "cat", "slide", -1, True, 0.5, "loaded", "default",
                  "loaded", "softmax", api_name="/compare")  # fmt: skip
    with pytest.raises(AppError, match="second model must be one of the offered ones"):
        c.predict(handle_file(str(CAT)), "cat", "slide", 0.5, True, 0.5, "loaded", "default",
                  "some/repo", "softmax", api_name="/compare")  # fmt: skip


def test_messages_are_plain_escaped_text(trained_url, tmp_path):
    c = client(trained_url)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(AppError) as error:
        segment(c, text, "cat")
    assert "object at 0x" not in str(error.value) and "not a readable image" in str(error.value)
    with pytest.raises(AppError) as error:
        segment(c, CAT, "cat, <img src=x onerror=alert(1)>")
    assert "<img" not in str(error.value) and "&lt;img src=x onerror=alert(1)&gt;" in str(
        error.value
    )


def test_bad_files_get_clear_messages(trained_url, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(write_photo(tmp_path / "ok.jpg", format="JPEG").read_bytes()[:300])
    cases = {
        empty: "empty",
        text: "not a readable image",
        truncated: "corrupt or truncated",
        forged_size_jpeg(tmp_path / "huge.jpg", 20000, 20000): "400 MP",
        forged_size_png(tmp_path / "huge.png", 20000, 20000): "400 MP",
    }
    c = client(trained_url)
    for path, message in cases.items():
        with pytest.raises(AppError, match=message):
            segment(c, path, "cat, dog")
    *_, info = segment(c, CAT, "cat, dog")  # still serving, same session usable
    assert [k["name"] for k in info["classes"]] == ["cat", "dog"]


def test_awkward_images_are_handled(trained_url, tmp_path):
    c = client(trained_url)
    for kind, path in awkward_images(tmp_path).items():
        *_, files, info = segment(c, path, "cat, dog")
        width, height = info["image_size"]
        assert label_map(files).shape == (height, width), kind
        if kind == "exif-rotated":
            assert (width, height) == (48, 96)  # stored 96×48, displayed upright
    *_, files, info = segment(c, big_jpeg(tmp_path / "big.jpg"), "cat, dog")
    assert info["image_size"] == [1024, 1024]
    assert "The image (12000×12000 px) was downscaled to 1024×1024 px" in info["note"]


def test_bad_vocabularies(trained_url):
    c = client(trained_url)
    cases = {
        " , \n ,": "at least one class name",
        "cat, <b>dog</b>": "markup is not allowed",
        ", ".join(f"thing{i}" for i in range(300)): "limit is 200",
        "cat, " + "x" * 80: "limit is 60",
        "cat, " + "ж" * 60: "is 120 CLIP tokens long; the limit is 60",  # 60 characters
    }
    for text, message in cases.items():
        with pytest.raises(AppError, match=message):
            segment(c, CAT, text)
    *_, info = segment(c, CAT, "cat, Cat , dog\ncat")
    assert [k["name"] for k in info["classes"]] == ["cat", "dog"]
    many = [f"object {i}" for i in range(150)]
    *_, files, info = segment(c, CAT, ", ".join(many))
    assert [k["name"] for k in info["classes"]] == many and label_map(files).max() < 150


def test_training_free_mode(dirs):
    loaded = load_model(None, clip_model=f"local-dir:{dirs[0]}", clip_pretrained=None)
    assert loaded.mode == "training-free", loaded.status
    with served(loaded) as url:
        assert "Training-free mode" in page_config(url) and "--model" in page_config(url)
        c = client(url)
        *_, files, info = segment(c, CAT, "cat, grass, sky")
        assert (
            info["mode"] == "training-free" and [k["seen"] for k in info["classes"]] == [None] * 3
        )
        sinkhorn = label_map(files)
        *_, files, info = c.predict("softmax", 1.0, True, 0.5, True, api_name="/rerender")
        assert info["attention"] == "softmax" and label_map(files).shape == sinkhorn.shape
        *_, note = c.predict("grass", api_name="/prompt_maps")
        assert "overlap" in note


def test_no_model_starts_and_explains(tmp_path):
    loaded = load_model(
        "nobody/no-such-otseg", clip_model=f"local-dir:{tmp_path / 'missing'}", clip_pretrained=None
    )
    assert loaded.mode == "none" and loaded.model is None
    with served(loaded) as url:
        config = page_config(url)
        assert "No model loaded" in config and "OTSEG_MODEL" in config
        with pytest.raises(AppError, match=r"^No model loaded\. Could not load nobody") as error:
            segment(client(url), CAT, "cat")
        assert not any(mark in str(error.value) for mark in ("**", "`", "⚠"))


def test_fast_inference_is_one_pass_and_switches_back(trained_url):
    c = client(trained_url)
    *_, files, info = segment(c, CAT, "cat, dog")
    assert info["inference"] == "slide"
    slide = label_map(files)
    *_, files, info = c.predict(handle_file(str(CAT)), "cat, dog", "sinkhorn", 0.5, True, 0.5,
                                "whole", api_name="/segment")  # fmt: skip
    assert info["inference"] == "whole" and label_map(files).shape == slide.shape
    *_, info = c.predict("softmax", 0.3, True, 0.5, api_name="/rerender")
    assert info["inference"] == "whole" and info["attention"] == "softmax"
    *_, files, info = segment(c, CAT, "cat, dog")
    assert info["inference"] == "slide" and np.array_equal(label_map(files), slide)
    with pytest.raises(AppError, match="^Inference must be one of slide, whole; got “fast”.$"):
        c.predict(handle_file(str(CAT)), "cat", "sinkhorn", 0.5, True, 0.5, "fast",
                  api_name="/segment")  # fmt: skip


def test_internal_errors_keep_their_traceback(dirs, capfd):
    """Only bad input becomes a message for the user; a bug is logged with its traceback."""
    from otseg.models.otseg import OTSeg

    loaded = load_model(str(dirs[1]))

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug, not the user's fault")

    loaded.model.decode = broken
    assert isinstance(loaded.model, OTSeg)
    with served(loaded) as url, pytest.raises(AppError) as error:
        segment(client(url), CAT, "cat")
    assert "internal bug" not in str(error.value)  # no internals shown as a toast
    log = capfd.readouterr().err
    assert "Traceback" in log and "RuntimeError: an internal bug" in log


def test_the_api_names_every_output_and_types_the_summary(trained_url):
    api = client(trained_url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    returns = {
        name: [r["label"] for r in api[name]["returns"]]
        for name in ("/segment", "/rerender", "/redraw", "/prompt_maps", "/status")
    }
    assert returns["/segment"] == returns["/rerender"] == ["overlay", "legend", "files", "info"]
    assert [r.lower() for r in returns["/prompt_maps"]] == ["sinkhorn", "softmax", "overlap"]
    assert returns["/redraw"] == ["overlay"] and returns["/status"] == ["mode"]
    info = api["/segment"]["returns"][3]["python_type"]["type"]
    assert info.startswith("dict(mode: str,") and "classes: list[dict(id: int" in info
    class_name = api["/prompt_maps"]["parameters"][0]["python_type"]["type"]
    assert class_name == "str"
    files = api["/rerender"]["parameters"][4]
    assert (files["parameter_name"], files["parameter_default"]) == ("files", False)
    assert "Trained OTSeg" in client(trained_url).predict(api_name="/status")
