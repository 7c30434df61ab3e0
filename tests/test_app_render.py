"""Pure demo pieces on synthetic data, and the handlers' caching with a counting model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import gpu, render
from app.compare import Comparisons, Side
from app.inference import ENGINE_LABELS, Handlers, LoadedModel
from app.overlay import legend_rows
from otseg.errors import UserError
from otseg.inference.engine import choose_backend
from tests.demo_helpers import write_photo
from tests.factories import save_tiny_clip, tiny_model


def test_fit_image_downscales_long_side_only():
    small = np.zeros((100, 200, 3), np.uint8)
    assert render.fit_image(small)[0] is small and render.fit_image(small)[1] == ""
    big, note = render.fit_image(np.zeros((1000, 3000, 3), np.uint8))
    assert big.shape == (341, 1024, 3)
    assert note == "The image (3000×1000 px) was downscaled to 1024×341 px."
    # a huge JPEG already reduced while decoding: the note gives the uploaded size
    _, note = render.fit_image(np.zeros((1000, 3000, 3), np.uint8), original=(24000, 8000))
    assert note.startswith("The image (24000×8000 px)")
    _, note = render.fit_image(np.zeros((600, 800, 3), np.uint8), original=(6400, 4800))
    assert note == "The image (6400×4800 px) was downscaled to 800×600 px."


def test_stored_size_reads_the_header_with_exif_rotation(tmp_path):
    from tests.demo_helpers import exif_rotated_jpeg

    assert render.stored_size(write_photo(tmp_path / "p.png", 30, 50).read_bytes()) == (50, 30)
    assert render.stored_size(exif_rotated_jpeg(tmp_path / "r.jpg", 48, 96).read_bytes()) == (
        48,
        96,
    )
    assert render.stored_size(b"not an image") is None


def test_summary_and_downloads(tmp_path):
    labels = np.array([[0, 0, 1, 1]], np.int32)
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    rows = legend_rows(["cat", "<dog>"], colors, labels, [True, False])
    info = render.summary(rows, labels.shape, mode="trained")
    assert info["mode"] == "trained" and info["image_size"] == [4, 1]
    assert info["classes"][1] == {
        "id": 1,
        "name": "<dog>",
        "color": "#0000ff",
        "seen": False,
        "share": 50.0,
    }
    no_split = legend_rows(["a", "b"], colors, labels)
    assert render.summary(no_split, labels.shape)["classes"][0]["seen"] is None
    png, js = render.write_downloads(tmp_path, labels, colors, info, "my photo-otseg-2-classes")
    assert Path(png).name == "my_photo-otseg-2-classes-labels.png"
    assert Path(js).name == "my_photo-otseg-2-classes.json"
    assert (
        np.array_equal(np.array(Image.open(png)), labels)
        and json.loads(Path(js).read_text()) == info
    )


def test_prompt_overlap_and_changed_share():
    same = np.ones((3, 4, 4))
    assert render.prompt_overlap(same) == pytest.approx(1.0)
    apart = np.zeros((2, 2, 2))
    apart[0, 0, 0] = apart[1, 1, 1] = 1.0
    assert render.prompt_overlap(apart) == pytest.approx(0.0)
    a = np.zeros((2, 2), np.int32)
    assert (
        render.changed_share(a, a) == 0.0
        and render.changed_share(a, a + np.eye(2, dtype=np.int32)) == 50.0
    )


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    clip = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    model = tiny_model(clip=f"local-dir:{clip}")
    calls = {"image": 0}
    h = Handlers(LoadedModel(model, "trained", "test"), tmp_path_factory.mktemp("dl"))
    tower = gpu._TOWERS[h.loaded.key]  # what runs this model's image tower (any backend)

    def counting(images):
        calls["image"] += 1
        return tower(images)

    gpu._TOWERS[h.loaded.key] = counting
    h.calls = calls
    return h


def test_page_says_which_backend_and_precision_ran(handlers, tmp_path):
    backend = choose_backend("auto", model=handlers.loaded.model)
    assert handlers.loaded.backend == backend and handlers.loaded.precision == "fp32"
    assert handlers.loaded.status.endswith(f"{ENGINE_LABELS[backend]}, fp32.")
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(write_photo(tmp_path / "p.png")), "cat", knobs)
    info = handlers.outputs(session, 0.5)["summary"]
    assert (info["backend"], info["precision"]) == (backend, "fp32")


def test_knob_changes_do_not_rerun_the_image_encoder(handlers, tmp_path):
    photo = write_photo(tmp_path / "p.png")
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(photo), "cat, class0", knobs)
    windows = handlers.calls["image"]  # one encoder pass per slide window of this image
    assert windows >= 1 and session.seen == [False, True]
    for attention, lam in (("softmax", 0.2), ("sinkhorn", 1.0), ("softmax", 0.0)):
        handlers.rerender(session, {"attention": attention, "lam": lam, "use_mps": True})
    handlers.outputs(session, 0.9)
    sides = (Side("loaded", "sinkhorn"), Side("loaded", "softmax"))
    Comparisons(handlers).compare(
        session, str(photo), "cat, class0", "slide", 0.5, True, 0.5, sides
    )
    handlers.prompt_maps(session, "cat")
    handlers.segment(session, str(photo), "cat, dog, sky", knobs)  # new names, same image
    assert handlers.calls["image"] == windows and session.names == ["cat", "dog", "sky"]
    handlers.segment(session, str(write_photo(tmp_path / "q.png", seed=1)), "cat", knobs)
    assert handlers.calls["image"] > windows
    before = handlers.calls["image"]
    handlers.segment(
        session, str(write_photo(tmp_path / "q.png", seed=1)), "cat", knobs, mode="whole"
    )
    assert handlers.calls["image"] == before + 1  # fast mode: one pass over the whole image
    assert session.predictor.mode == "whole" and session.names == ["cat"]


def test_sessions_are_independent(handlers, tmp_path):
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    a = handlers.segment(None, str(write_photo(tmp_path / "a.png", 64, 64)), "cat, dog", knobs)
    b = handlers.segment(None, str(write_photo(tmp_path / "b.png", 80, 120, 2)), "sky", knobs)
    assert a.predictor is not b.predictor and a.predictor.model.key == b.predictor.model.key
    assert a.labels.shape == (64, 64) and b.labels.shape == (80, 120) and a.names == ["cat", "dog"]
    with pytest.raises(UserError, match="Segment first"):
        handlers.rerender(None, knobs)


def test_only_user_errors_become_toasts():
    """The demo shows a UserError (CheckpointError, ImageError, bad class names…) as an
    escaped toast; a plain ValueError is a bug and propagates with its traceback."""
    import gradio as gr

    from app.ui import user_errors
    from otseg.errors import CheckpointError

    def raising(exc):
        return user_errors(lambda: (_ for _ in ()).throw(exc))

    for exc in (UserError("Class name “<b>” is bad"), CheckpointError("not a checkpoint")):
        with pytest.raises(gr.Error) as info:
            raising(exc)()
        assert info.value.message == str(exc).replace("<", "&lt;").replace(">", "&gt;")
    with pytest.raises(ValueError, match="internal shape") as info:
        raising(ValueError("internal shape mismatch"))()
    assert not isinstance(info.value, gr.Error)


def test_out_of_date_banner_follows_the_inference_mode_in_use(handlers, tmp_path):
    """The banner under the inputs stays empty while image and names are those of the result,
    also for a result of the fast (whole-image) mode."""
    from app.ui import STALE, build

    fns = [f.fn for f in build(handlers).fns.values()]
    changed = next(fn for fn in fns if fn.__name__ == "on_inputs_changed")
    photo = str(write_photo(tmp_path / "p.png"))
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, photo, "cat, dog", knobs, mode="whole")
    assert changed(photo, "cat, dog", "whole", session) == ""
    assert changed(photo, "cat, sky", "whole", session) == STALE


def test_old_download_folders_are_pruned_at_most_once_a_minute(tmp_path, monkeypatch):
    labels, colors = np.zeros((2, 2), np.int32), np.zeros((1, 3), np.uint8)
    clock = [1e9]
    monkeypatch.setattr(render.time, "time", lambda: clock[0])

    def old_folder(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "x.png").write_bytes(b"")
        os.utime(folder, (clock[0] - render.DOWNLOAD_AGE_S - 1,) * 2)
        return folder

    first = old_folder("first")
    render.write_downloads(tmp_path, labels, colors, {})
    assert not first.exists()
    second = old_folder("second")
    render.write_downloads(tmp_path, labels, colors, {})  # within the minute: no scan
    assert second.exists()
    clock[0] += render.PRUNE_EVERY_S
    render.write_downloads(tmp_path, labels, colors, {})
    assert not second.exists() and len(list(tmp_path.iterdir())) == 3


def test_overlay_outputs_count_the_pixels_once(handlers, tmp_path, monkeypatch):
    """Legend and summary JSON share one pass of class shares over the label map."""
    from app import overlay

    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(write_photo(tmp_path / "p.png")), "cat, dog", knobs)
    calls = []
    shares = overlay.class_shares
    monkeypatch.setattr(overlay, "class_shares", lambda *a: calls.append(1) or shares(*a))
    out = handlers.outputs(session, 0.5)
    assert len(calls) == 1
    assert [c["share"] for c in out["summary"]["classes"]] == [
        round(float(s), 2) for s in shares(session.labels, 2)
    ]


def _library_prediction(handlers, path: Path, names: list[str], seen: list[bool], knobs: dict):
    """What the library says for this file, names and knobs: a fresh OTSegPredictor on the
    demo's model (no demo code in between)."""
    from otseg.inference.predictor import OTSegPredictor

    reference = OTSegPredictor(handlers.loaded.model)
    reference.set_image(np.asarray(Image.open(path).convert("RGB")))
    reference.set_vocabulary(names, seen=seen)
    return reference.predict(**knobs)


def _check_views(handlers, session, path: Path, names, seen, knobs) -> None:
    """Labels equal the library's exactly; the overlay is the blend of this image with the
    legend's colours (each label's pixels at opacity 1 are its legend row's colour)."""
    want = _library_prediction(handlers, path, names, seen, knobs)
    assert session.names == names and session.seen == seen
    np.testing.assert_array_equal(session.labels, want.labels)
    image = np.asarray(Image.open(path).convert("RGB"))
    out = handlers.outputs(session, 1.0, with_files=False)
    rows = out["summary"]["classes"]
    assert [r["name"] for r in rows] == names
    colors = np.array([[int(r["color"][i : i + 2], 16) for i in (1, 3, 5)] for r in rows])
    np.testing.assert_array_equal(out["overlay"], colors[want.labels])
    for r in rows:
        assert f'background:{r["color"]}"></span> {r["name"]}' in out["legend"]
    half = handlers.draw(session, 0.5)
    blend = np.rint(0.5 * image + 0.5 * colors[want.labels].astype(np.float64))
    np.testing.assert_array_equal(half, blend.astype(np.uint8))


def _check_prompt_maps(handlers, session, path: Path, names, seen) -> None:
    """The prompt-map view of each class shows that class's maps under each attention (its
    overlap score equals the one of the library's per-prompt maps of that class)."""
    for attention in ("sinkhorn", "softmax"):
        want = _library_prediction(
            handlers, path, names, seen, {"attention": attention, "use_mps": True}
        )
        overlaps = [render.prompt_overlap(np.clip(m, 0, None)) for m in want.prompt_maps]
        assert len({round(o, 6) for o in overlaps}) == len(names)  # the classes differ
        for k, name in enumerate(names):
            got = handlers.prompt_maps(session, name)["overlap"][attention]
            assert got == pytest.approx(overlaps[k]), (attention, name)


def test_each_view_after_each_kind_of_change_equals_the_library(handlers, tmp_path):
    """A sequence as a user clicks it: segment, upload a second image, change λ, switch the
    attention, reorder the names. After each step the labels equal the library's
    ``predict(...)`` for that image, order and knobs exactly, and overlay and legend agree."""
    first = write_photo(tmp_path / "first.png", 96, 128, seed=0)
    second = write_photo(tmp_path / "second.png", 80, 112, seed=3)
    names, seen = ["cat", "class0", "dog"], [False, True, False]  # class0: seen in tiny
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(first), ", ".join(names), knobs)
    _check_views(handlers, session, first, names, seen, knobs)
    session = handlers.segment(session, str(second), ", ".join(names), knobs)
    _check_views(handlers, session, second, names, seen, knobs)
    for change in ({"lam": 0.2}, {"attention": "softmax", "lam": 0.9}, {"use_mps": False}):
        knobs = {**knobs, **change}
        handlers.rerender(session, knobs)
        _check_views(handlers, session, second, names, seen, knobs)
    reordered = ["dog", "class0", "cat"]
    session = handlers.segment(session, str(second), ", ".join(reordered), knobs)
    _check_views(handlers, session, second, reordered, [False, True, False], knobs)
    _check_prompt_maps(handlers, session, second, reordered, [False, True, False])


def test_legend_and_overlay_colours_agree_beyond_twenty_classes(handlers, tmp_path):
    """25 classes: past the 20 hand-picked colours, each label's overlay colour is still its
    legend row's colour."""
    photo = write_photo(tmp_path / "many.png", 96, 128, seed=5)
    names = [f"thing {i}" for i in range(25)]
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(photo), ", ".join(names), knobs)
    _check_views(handlers, session, photo, names, [False] * 25, knobs)
    present = [names[k] for k in np.unique(session.labels)]  # these names go last
    names = [n for n in names if n not in present] + present
    session = handlers.segment(session, str(photo), ", ".join(names), knobs)
    assert session.labels.max() >= 20  # colours beyond the first 20 are drawn
    _check_views(handlers, session, photo, names, [False] * 25, knobs)


def test_examples_are_answered_from_the_cache(handlers, tmp_path):
    """An example segmented once (warmed at start, or its first click) answers every later
    click, in any session, without running the encoders, with the same labels; other images
    and other names for the example's image are segmented as usual."""
    photo = write_photo(tmp_path / "example.png", seed=7)
    handlers.set_examples([(photo, "cat, class0, sky")])
    handlers.warm_examples()
    windows = handlers.calls["image"]
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    copy = tmp_path / "uploaded-copy.png"  # gradio hands the page its own copy of the file
    copy.write_bytes(photo.read_bytes())
    first = handlers.segment(None, str(copy), "cat, class0, sky", knobs)
    again = handlers.segment(first, str(copy), "cat, class0, sky", {**knobs, "lam": 0.2})
    assert handlers.calls["image"] == windows  # no encoder run for either
    assert first.image_path == str(copy) and first.image_name == "uploaded-copy"
    fresh = Handlers(handlers.loader, handlers.download_dir)  # the reference, computed anew
    want = fresh.segment(None, str(photo), "cat, class0, sky", {**knobs, "lam": 0.2})
    assert np.array_equal(again.labels, want.labels) and again.knobs["lam"] == 0.2
    assert handlers.calls["image"] > windows
    before = handlers.calls["image"]
    other = handlers.segment(None, str(copy), "cat, dog", knobs)  # other names: not cached
    assert other.names == ["cat", "dog"] and handlers.calls["image"] > before
