"""The demo in a real Chromium, as a person uses it: examples, Enter, live settings (mouse and
keyboard), progress during a wait, fresh views after a new upload, errors that keep the result,
a phone-sized screen and dark mode. One server and one browser serve the whole module; each
test opens its own tab (its own session). Also saves the README picture
(``tests/artifacts/demo-readme.png``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app import gpu
from app.inference import load_model
from app.main import LAUNCH, build_demo
from tests.browser import chromium, launched, open_page
from tests.demo_helpers import tiny_dirs, write_photo

pytestmark = pytest.mark.browser

LEGEND = "document.querySelector('#legend').innerText"
OVERLAY = "(document.querySelector('#overlay img') || {}).src || ''"
STALE = "document.querySelector('#stale').innerText"
APPLIED = "document.querySelector('#applied').innerText"
ASSETS = Path(__file__).resolve().parents[1] / "assets"


class Gate:
    """Holds the image encoder while armed, so a test can look at the page mid-Segment."""

    def __init__(self, encode) -> None:
        self.encode = encode
        self.armed = False
        self.open = threading.Event()

    def __call__(self, images):
        if self.armed:
            assert self.open.wait(60), "the test never opened the gate"
        return self.encode(images)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    _, model_dir = tiny_dirs(root)
    model_dir = model_dir.rename(root / "tiny-random-otseg")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the mode line then names the model without a temp path
        loaded = load_model(model_dir.name)
    gate = Gate(gpu._TOWERS[loaded.key])  # what runs the image tower, on any backend
    gpu._TOWERS[loaded.key] = gate
    with launched(build_demo(loaded), **LAUNCH) as url, chromium() as context:
        yield url, context, gate, root


def _page(served, name: str, **options):
    url, context, *_ = served
    return open_page(context, url + options.pop("query", ""), name, **options)


def _wait_changed(page, expression: str, before: str) -> str:
    page.wait_for_function(f"(before) => ({expression}) !== before", arg=before)
    return page.evaluate(expression)


def _release_slider(page, elem_id: str, fraction: float) -> None:
    slider = page.locator(f"#{elem_id} input[type=range]")
    slider.scroll_into_view_if_needed()
    track = slider.bounding_box()
    x = track["x"] + 1 + (track["width"] - 2) * fraction
    page.mouse.click(x, track["y"] + track["height"] / 2)


def _upload_and_segment(page, photo: Path, names: str) -> None:
    page.locator("#image input[type=file]").set_input_files(str(photo))
    page.locator("#image img").first.wait_for()
    page.locator("#vocab textarea").fill(names)
    page.locator("#segment").click()
    first = names.split(",")[0].strip()
    page.wait_for_function(f"({LEGEND}).includes({first!r}) && ({STALE}).trim() === ''")


def _overlay_width(page) -> int:
    return page.evaluate("document.querySelector('#overlay img').naturalWidth")


def test_live_settings_fresh_views_and_escaped_messages(served):
    with _page(served, "demo") as session:
        page = session.page
        assert "Trained OTSeg" in page.locator("#mode").inner_text()
        vocab = page.locator("#vocab textarea")

        # an example runs when clicked; then Enter in the class-name box segments and
        # Shift+Enter is a new line
        page.get_by_text("cat, eye, nose, ear, whiskers, background").first.click()
        page.wait_for_function(f"({LEGEND}).includes('whiskers')")
        overlay = page.evaluate(OVERLAY)
        vocab.click()
        page.keyboard.press("End")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("fur")
        assert vocab.input_value().endswith("background\nfur")
        page.keyboard.press("Enter")
        page.wait_for_function(f"({LEGEND}).includes('fur')")
        assert vocab.input_value().endswith("background\nfur")  # Enter added no line
        overlay, legend = page.evaluate(OVERLAY), page.evaluate(LEGEND)
        assert overlay and "novel" in legend and "%" in legend
        session.screenshot("readme")

        # settings apply on release, without pressing Segment
        page.locator("#attention").get_by_text("Softmax (multi-prompt ablation)").click()
        overlay = _wait_changed(page, OVERLAY, overlay)
        _release_slider(page, "lam", 1.0)
        overlay = _wait_changed(page, OVERLAY, overlay)
        assert page.locator("#lam input[type=range]").input_value() == "1"
        _release_slider(page, "opacity", 0.8)
        overlay = _wait_changed(page, OVERLAY, overlay)

        # the comparison and the prompt maps belong to one result ...
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare").click()
        page.wait_for_function(
            "document.querySelector('#compare_note').innerText.includes('differ')"
        )
        _release_slider(page, "lam", 0.0)  # a setting changed: the comparison says so
        page.wait_for_function(
            "document.querySelector('#compare_note').innerText.includes('Out of date')"
        )
        page.get_by_role("tab", name="Per-prompt maps").click()
        page.locator("#show_maps").click()
        page.locator("#grid_sinkhorn img").wait_for()
        session.screenshot("prompt-maps")

        # ... new names: the overlay says it is out of date until the next result
        vocab.fill("cat, sofa")
        page.wait_for_function(f"({STALE}).includes('changed since this result')")
        page.get_by_role("tab", name="Overlay").click()
        _release_slider(page, "lam", 0.5)  # a setting re-segments with the current names
        page.wait_for_function(f"({LEGEND}).includes('sofa') && !({LEGEND}).includes('fur')")
        page.wait_for_function(f"({STALE}).trim() === ''")
        page.get_by_role("tab", name="Per-prompt maps").click()
        page.wait_for_function("!document.querySelector('#grid_sinkhorn img')")  # cleared
        assert "Pick a class" in page.locator("#maps_note").inner_text()
        page.get_by_role("tab", name="Compare").click()
        assert "Out of date" in page.locator("#compare_note").inner_text()
        assert session.page_errors == []


def test_stage_progress_reaches_the_page(served):
    *_, gate, root = served
    with _page(served, "progress") as session:
        page = session.page
        page.locator("#image input[type=file]").set_input_files(
            str(write_photo(root / "progress.png", 64, 96, seed=4))
        )
        page.locator("#image img").first.wait_for()
        page.locator("#vocab textarea").fill("cat, dog")
        gate.armed, _ = True, gate.open.clear()
        try:
            page.locator("#segment").click()
            # the encoder is held: the stage must be on the page now, not after the result
            page.get_by_text("Encoding the image").first.wait_for()
        finally:
            gate.armed, _ = False, gate.open.set()
        page.wait_for_function(f"({LEGEND}).includes('dog')")


def test_a_new_upload_never_shows_the_old_image(served):
    *_, root = served
    first = write_photo(root / "first.png", 64, 96, seed=1)
    second = write_photo(root / "second.png", 80, 144, seed=2)
    with _page(served, "new-upload") as session:
        page = session.page
        _upload_and_segment(page, first, "cat, dog")
        page.get_by_role("tab", name="Per-prompt maps").click()
        page.locator("#show_maps").click()
        page.locator("#grid_sinkhorn img").wait_for()
        assert _overlay_width(page) == 96
        grid = page.evaluate("document.querySelector('#grid_sinkhorn img').src")

        page.locator("#image button[aria-label='Remove Image']").first.click()
        page.locator("#image input[type=file]").set_input_files(str(second))
        page.wait_for_function(f"({STALE}).includes('changed since this result')")
        page.locator("#show_maps").click()  # segments the new image first, then its maps
        page.wait_for_function(f"({STALE}).trim() === ''")
        _wait_changed(page, "(document.querySelector('#grid_sinkhorn img') || {}).src", grid)
        page.get_by_role("tab", name="Overlay").click()
        page.wait_for_function("document.querySelector('#overlay img').naturalWidth === 144")
        assert session.page_errors == []


def test_keyboard_and_typed_lambda_are_applied(served):
    *_, root = served
    with _page(served, "keyboard") as session:
        page = session.page
        _upload_and_segment(page, write_photo(root / "keys.png", seed=3), "cat, dog, sky")
        assert "λ = 0.50" in page.evaluate(APPLIED)
        overlay = page.evaluate(OVERLAY)
        page.locator("#lam input[type=range]").focus()
        page.keyboard.press("ArrowRight")  # one step: 0.55
        page.wait_for_function(f"({APPLIED}).includes('λ = 0.55')")
        number = page.locator("#lam input[type=number]")
        number.fill("0.3")
        number.press("Enter")
        page.wait_for_function(f"({APPLIED}).includes('λ = 0.30')")
        assert page.evaluate(OVERLAY) != overlay
        page.locator("#opacity input[type=range]").focus()
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(f"({APPLIED}).includes('opacity 0.45')")
        assert session.page_errors == []


def test_an_error_keeps_the_result_and_is_shown_once(served):
    *_, root = served
    with _page(served, "errors") as session:
        page = session.page
        _upload_and_segment(page, write_photo(root / "errors.png", seed=5), "cat, dog")
        overlay, legend = page.evaluate(OVERLAY), page.evaluate(LEGEND)
        # user text in a message is shown as text, never as markup
        payload = 'cat, <img src=x id=injected onerror="window.__hit=1">'
        page.locator("#vocab textarea").fill(payload)
        page.keyboard.press("Enter")
        toast = page.get_by_test_id("toast-body")
        toast.first.wait_for()
        assert "<img src=x id=injected" in toast.first.inner_text()
        assert page.locator("#injected").count() == 0
        assert page.evaluate("window.__hit") is None
        page.wait_for_timeout(500)  # any late second message or error mark would be here now
        assert toast.count() == 1
        assert page.evaluate(OVERLAY) == overlay and page.evaluate(LEGEND) == legend
        assert page.locator("#result .error").count() == 0  # no "Error" mark on any panel
        assert "changed since this result" in page.evaluate(STALE)
        assert session.page_errors == []


def test_on_a_phone_the_result_comes_into_view(served):
    with _page(served, "phone", viewport={"width": 390, "height": 844}) as session:
        page = session.page
        page.locator("#image input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
        page.locator("#image img").first.wait_for()
        page.locator("#vocab textarea").fill("cat, background")
        page.locator("#segment").scroll_into_view_if_needed()
        page.locator("#segment").click()
        page.wait_for_function(f"({LEGEND}).includes('background')")
        page.wait_for_function(
            "(() => { const r = document.querySelector('#overlay').getBoundingClientRect();"
            " return r.top >= -1 && r.top < window.innerHeight / 2; })()"
        )


def _luminance(rgb: tuple[float, ...]) -> float:
    def channel(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


COLOURS = """(selector) => {
  const el = document.querySelector(selector);
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  let bg = el;
  while (bg && rgb(getComputedStyle(bg).backgroundColor)[3] === 0) bg = bg.parentElement;
  return [rgb(getComputedStyle(el).color), rgb(getComputedStyle(bg || document.body).backgroundColor)];
}"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_seen_and_novel_badges_are_readable_in_both_themes(served, theme):
    *_, root = served
    with _page(served, f"badges-{theme}", query=f"?__theme={theme}") as session:
        page = session.page
        assert page.evaluate("document.body.classList.contains('dark')") == (theme == "dark")
        _upload_and_segment(page, write_photo(root / "badges.png", seed=6), "class0, sofa")
        for badge in ("seen", "novel"):
            text, background = page.evaluate(COLOURS, f"#legend .badge-{badge}")
            assert _contrast(tuple(text), tuple(background)) >= 4.5, (badge, text, background)
