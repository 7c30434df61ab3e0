"""``otseg segment`` end to end on a folder of generated photos with one bad file: outputs
written and equal to the library's predictor, the bad file reported and skipped (exit code 1),
an interrupted run resumed without doing an image twice or missing one, settings changes
refused, two processes writing what one writes; and the input rules."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import otseg.segment_cli as seg
import otseg.segment_files as files
from factories import random_photo, save_tiny_clip, tiny_model, tiny_zegot
from otseg import cli
from otseg.errors import UserError
from otseg.inference.predictor import OTSegPredictor
from otseg.weights.pretrained import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cat", "sofa", "floor"]
SIZES = {"a.jpg": (80, 112), "b.png": (96, 96), "trip/c.jpg": (72, 120), "trip/d.jpeg": (88, 100)}
BROKEN = "trip/broken.jpg"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny OTSeg with a tiny CLIP text tower (so any class name can be encoded), saved."""
    root = tmp_path_factory.mktemp("model")
    clip = save_tiny_clip(root / "clip")
    return tiny_model(clip=f"local-dir:{clip}").save_pretrained(root / "otseg")


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_photo(h, w, seed=i)).save(folder / name)
    (folder / BROKEN).write_bytes(b"\xff\xd8 this is not a JPEG")
    (folder / "notes.txt").write_text("not an image extension: not an input")
    (folder / ".thumbs").mkdir()
    Image.fromarray(random_photo(32, 32)).save(folder / ".thumbs" / "hidden.jpg")
    return folder


def otseg_segment(*args: str) -> int:
    """``otseg segment ARGS`` in this process, as the console command runs it; its exit code."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["segment", *map(str, args)])
    return stop.value.code


def outputs(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_a_folder_is_segmented_and_the_bad_file_skipped(photos, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = otseg_segment(photos, "--model", model_dir, "--names", ", ".join(NAMES), "--out", out,
                         "--masks", "--workers", "2")  # fmt: skip
    err = capsys.readouterr()
    assert code == 1  # one image failed
    assert f"skipped {photos / BROKEN}: " in err.err and "not a readable image" in err.err
    assert "4 segmented, 0 already done, 1 failed of 5 images" in err.out

    predictor = OTSegPredictor(from_pretrained(model_dir))
    predictor.set_vocabulary(NAMES)
    for name, (h, w) in SIZES.items():
        labels = np.array(Image.open(out / f"{stem(name)}.labels.png"))
        predictor.set_image(photos / name)
        want = predictor.predict()
        np.testing.assert_array_equal(labels, want.labels)  # pixel value = class index
        info = json.loads((out / f"{stem(name)}.json").read_text())
        assert info["image_size"] == [w, h]
        assert [c["name"] for c in info["classes"]] == NAMES
        assert [c["seen"] for c in info["classes"]] == want.seen
        shares = [100.0 * np.mean(want.labels == k) for k in range(len(NAMES))]
        np.testing.assert_allclose([c["share"] for c in info["classes"]], shares, atol=1e-3)
        assert info["settings"]["names"] == NAMES and info["settings"]["attention"] == "sinkhorn"
        beside = (out / name).parent  # output paths in a JSON are relative to its folder
        overlay = np.asarray(Image.open(beside / info["outputs"]["overlay"]), dtype=np.float64)
        photo = np.asarray(Image.open(photos / name), dtype=np.float64)
        colors = np.array([[int(c["color"][i : i + 2], 16) for i in (1, 3, 5)]
                           for c in info["classes"]])  # fmt: skip
        blend = 0.5 * photo + 0.5 * colors[want.labels]
        assert (
            overlay.shape == (h, w, 3) and np.abs(overlay - blend).mean() < 8
        )  # JPEG q90 (another class: > 30)
        for k, class_name in enumerate(NAMES):
            present = (want.labels == k).any()
            assert (class_name in info["outputs"]["masks"]) == present
            if present:
                mask = np.array(Image.open(beside / info["outputs"]["masks"][class_name]))
                np.testing.assert_array_equal(mask == 255, want.labels == k)

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["input"] for r in rows] == sorted(str(photos / n) for n in [*SIZES, BROKEN])
    by_input = {r["input"]: r for r in rows}
    assert by_input[str(photos / BROKEN)]["status"] == "failed"
    assert "not a readable image" in by_input[str(photos / BROKEN)]["reason"]
    assert {r["status"] for i, r in by_input.items() if "broken" not in i} == {"segmented"}
    records = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [r["input"] for r in records] == [r["input"] for r in rows]
    assert not list(out.rglob("*.otseg-tmp")) and not (out / ".thumbs").exists()


def test_the_text_is_encoded_once_per_run(photos, model_dir, tmp_path, monkeypatch):
    from otseg.models.otseg import OTSeg

    calls = []
    embed = OTSeg.embed_text
    monkeypatch.setattr(
        OTSeg, "embed_text", lambda self, names: calls.append(names) or embed(self, names)
    )
    otseg_segment(
        photos, "--model", model_dir, "--names", "cat, sofa", "--out", tmp_path / "o", "-q"
    )
    assert calls == [["cat", "sofa"]]


def test_an_interrupted_run_resumes_without_repeating_or_missing_an_image(
    photos, model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    args = [photos, "--model", model_dir, "--names", "cat, sofa", "--out", out, "-q"]
    written: list[list[str]] = [[], []]
    write = files.write_outputs
    run = 0

    def spy(job, *a, **k):
        written[run].append(job.path.name)
        return write(job, *a, **k)

    monkeypatch.setattr(files, "write_outputs", spy)
    predict = OTSegPredictor.predict
    count = 0

    def ctrl_c_at_the_third(self, **knobs):
        nonlocal count
        count += 1
        if count == 3:
            raise KeyboardInterrupt
        return predict(self, **knobs)

    monkeypatch.setattr(OTSegPredictor, "predict", ctrl_c_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        cli.dispatch(["segment", *map(str, args)])
    assert len(written[0]) == 2  # the two images predicted before Ctrl-C were written whole
    assert not list(out.rglob("*.otseg-tmp")) and not (out / "summary.csv").exists()
    for done in out.rglob("*.json"):
        info = json.loads(done.read_text())
        assert all((done.parent / f).is_file() for f in info["outputs"].values())

    monkeypatch.setattr(OTSegPredictor, "predict", predict)
    run = 1
    assert otseg_segment(*args) == 1  # the broken file still fails
    assert not set(written[0]) & set(written[1])  # no image twice ...
    assert sorted(written[0] + written[1]) == sorted(
        Path(n).name for n in SIZES
    )  # ... none missing
    rows = {r["input"]: r["status"] for r in csv.DictReader((out / "summary.csv").open())}
    for name in SIZES:
        first = Path(name).name in written[0]
        assert rows[str(photos / name)] == ("already done" if first else "segmented")


def test_other_settings_are_refused_until_overwrite(photos, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = [photos / "a.jpg", "--model", model_dir, "--out", out, "-q"]
    assert otseg_segment(*base, "--names", "cat, sofa") == 0
    assert otseg_segment(*base, "--names", "cat, sofa", "--lam", "0.2") == 2
    assert "1 image(s) in" in capsys.readouterr().err
    code = otseg_segment(*base, "--names", "cat, dog")
    err = capsys.readouterr().err
    assert code == 2 and "names differ" in err and "--overwrite" in err
    assert otseg_segment(*base, "--names", "cat, dog", "--overwrite") == 0
    info = json.loads((out / "a.json").read_text())
    assert info["settings"]["names"] == ["cat", "dog"]
    assert otseg_segment(*base, "--names", "cat, dog", "--masks") == 0  # new output kind: redone
    assert "masks" in json.loads((out / "a.json").read_text())["outputs"]


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, list[str]]:
    """``--model`` arguments of the other kinds the library loads: ZegOT and training-free CLIP."""
    root = tmp_path_factory.mktemp("models")
    tiny_zegot().save_pretrained(root / "zegot")
    clip = save_tiny_clip(root / "clip")
    return {
        "zegot": ["--model", str(root / "zegot")],
        "training-free": ["--model", "training-free", "--clip", f"local-dir:{clip}",
                          "--clip-pretrained", "none"],
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["zegot", "training-free"])
@pytest.mark.parametrize("iterations", ["original", "3"])
def test_every_kind_of_model_segments(kind, iterations, other_models, photos, tmp_path):
    """The labels of ZegOT and training-free CLIP, with the original stopping rule (the
    predictor) and with fixed iterations (batched windows), equal the predictor's."""
    from otseg.nn.mpsa import fixed_sinkhorn

    args = other_models[kind]
    out = tmp_path / "out"
    code = otseg_segment(photos / "a.jpg", photos / "b.png", *args, "--names", "cat, dog",
                         "--iterations", iterations, "--out", out, "-q")  # fmt: skip
    assert code == 0
    model = seg.load_model(args[1], *(args[3], None) if kind == "training-free" else ("", None))
    predictor = OTSegPredictor(model)
    predictor.set_vocabulary(["cat", "dog"])
    for name in ("a.jpg", "b.png"):
        predictor.set_image(photos / name)
        with fixed_sinkhorn(model, None if iterations == "original" else int(iterations)):
            want = predictor.predict()
        labels = np.array(Image.open(out / f"{stem(name)}.labels.png"))
        assert (labels == want.labels).mean() > 0.999  # batched windows: float-order ties only


def test_bad_arguments_are_one_line_errors(photos, model_dir, tmp_path, capsys):
    base = ["--model", model_dir, "--out", tmp_path / "o"]
    for args, message in [
        ([tmp_path / "nothing-here", *base], "no such file or folder"),
        ([str(photos / "*.gif"), *base], "matches no image file"),
        ([photos, *base, "--names", "cat", "--names-file", photos / "notes.txt"], "not both"),
        ([photos, *base, "--iterations", "many"], "--iterations must be"),
        ([photos, *base, "--names", "cat", "--attention", "magic"], "attention must be one of"),
        ([photos, *base, "--device", "cuda:7"] if not _has_cuda() else [], "no usable CUDA"),
    ]:
        if not args:
            continue
        assert otseg_segment(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- inputs -----------------------------------------------------------------------------------
def test_inputs_from_folders_globs_and_lists(photos, tmp_path):
    jobs = files.collect_inputs([str(photos)])
    assert [j.key for j in jobs] == ["a", "b", "trip/broken", "trip/c", "trip/d"]
    globbed = files.collect_inputs([str(photos / "**" / "*.jpg")])
    assert [j.key for j in globbed] == ["a", "trip/broken", "trip/c"]  # recursive, hidden skipped
    listing = photos / "trip" / "list.txt"
    listing.write_text("# my photos\nc.jpg\n\n../a.jpg\nmissing.jpg\n")
    listed = files.collect_inputs([str(listing)])
    assert [(j.path.name, j.key) for j in listed] == [
        ("c.jpg", "trip/c"), ("a.jpg", "a"), ("missing.jpg", "trip/missing")
    ]  # fmt: skip
    again = files.collect_inputs([str(photos), str(photos / "a.jpg")])  # the same file once
    assert len(again) == len(jobs)
    inside = files.collect_inputs([str(photos)], exclude=photos / "trip")
    assert [j.key for j in inside] == ["a", "b"]  # an --out inside the input is not read back


def test_output_names_never_collide(tmp_path):
    for folder, names in {"in": ("x.jpg", "x.png", "y.jpg"), "other": ("y.jpg",)}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(random_photo(32, 32)).save(tmp_path / folder / name)
    keys = [j.key for j in files.collect_inputs([str(tmp_path / "in")])]
    assert keys == ["x.jpg", "x.png", "y"]  # the suffix kept only where stems clash
    with pytest.raises(UserError, match="would write the same outputs"):
        files.collect_inputs([str(tmp_path / "in"), str(tmp_path / "other")])


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "x.png"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, b"data")
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    files.write_atomic(target, b"data")
    assert target.read_bytes() == b"data" and list(target.parent.iterdir()) == [target]


# -- several processes ------------------------------------------------------------------------
def test_a_process_share_is_what_accelerate_splits(monkeypatch):
    from accelerate import PartialState

    items = list(range(11))
    state = PartialState(cpu=True)
    try:
        for count in (1, 2, 3, 4, 12):
            shares = []
            for rank in range(count):
                monkeypatch.setattr(state, "num_processes", count, raising=False)
                monkeypatch.setattr(state, "process_index", rank, raising=False)
                with state.split_between_processes(items) as want:
                    share = seg.Processes.__new__(seg.Processes)
                    share.count, share.rank = count, rank
                    assert share.split(items) == list(want)
                    shares += share.split(items)
            assert shares == items
    finally:
        monkeypatch.undo()
        from train_helpers import reset_accelerate

        reset_accelerate()


@pytest.mark.slow
def test_two_processes_write_what_one_writes(photos, model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = ["-m", "otseg", "segment", str(photos), "--model", str(model_dir), "--names",
            ", ".join(NAMES), "--masks", "-q", "--out"]  # fmt: skip
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    two = subprocess.run([*launch, *args, str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert one.returncode == 1, one.stderr[-3000:]
    assert two.returncode == 1, two.stderr[-3000:]  # exit 1 from the process that met the bad file
    assert two.stderr.count(f"skipped {photos / BROKEN}") == 1
    assert "4 segmented, 0 already done, 1 failed of 5 images" in two.stdout
    assert "on 2 processes" in two.stdout
    a, b = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) > 10
    assert all(a[k] == b[k] for k in a)


@pytest.mark.slow
def test_ctrl_c_stops_with_130_leaves_whole_files_and_the_rerun_finishes(model_dir, tmp_path):
    """A real SIGINT to the command while it writes: exit code 130, no temporary or partial
    file, every JSON's files present; the same command again does exactly the rest."""
    import glob
    import signal
    import time

    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(200):  # far more than are written before the signal arrives
        Image.fromarray(random_photo(48, 64, seed=i % 7)).save(photos / f"p{i:03d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "otseg", "segment", str(photos), "--model", str(model_dir),
           "--names", "cat, sofa", "--masks", "-q", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(glob.glob(str(out / "*.json"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert not list(out.rglob("*.otseg-tmp")) and not (out / "summary.csv").exists()
    first = sorted(p.name for p in out.glob("*.json"))
    assert 5 <= len(first) < 200
    for done in out.glob("*.json"):
        info = json.loads(done.read_text())
        assert Image.open(out / info["outputs"]["labels"]).size == (64, 48)
        assert all((out / f).is_file() for f in info["outputs"]["masks"].values())
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{200 - len(first)} segmented, {len(first)} already done, 0 failed" in again.stdout
