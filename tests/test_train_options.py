"""Run options of ``train.train`` on the tiny preset, in process: periodic evaluation with the
best model kept, the learning rate and evaluation scalars logged at their step, the push
preflight and end-of-run message, the custom-label check at start, training on the original's
``.npy`` embeddings, a converted checkpoint's stored embeddings, a local CLIP weights file and
the offline CLIP error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from train_helpers import reset_accelerate, tiny_args

from factories import TINY_CLIP_CFG, save_tiny_clip
from otseg.data.datasets import read_label
from otseg.data.synthetic import write_synthetic
from otseg.errors import WeightsNotFoundError
from otseg.models.otseg import OTSeg
from otseg.weights.store import load_text_bank
from train.build import build_config, build_training_model, load_frozen_clip
from train.optim import poly_warmup_lr
from train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data"), "voc", num_train=4, num_val=2)


def test_eval_every_keeps_the_best_and_logs_at_the_right_step(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import train.engine
    from train.train import main

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))  # fmt: skip
    reads = []  # the step logs are read from the device in batches, not once per step
    log_steps = train.engine.log_steps
    monkeypatch.setattr(
        train.engine, "log_steps", lambda acc, pending: reads.append(len(pending)) or log_steps(acc, pending)
    )  # fmt: skip
    monkeypatch.setattr(train.engine, "LOG_EVERY", 3)
    out = tmp_path / "run"
    main(tiny_args(data, out, "--max-iters", "4", "--eval-every", "2", "--checkpoint-every", "2"))
    assert reads == [3, 1]  # at step 3 (a multiple of LOG_EVERY), then at the end
    lrs = {step: v["train/lr"] for step, v in logged if "train/lr" in v}
    recipe = load_recipe("tiny")
    assert sorted(lrs) == [1, 2, 3, 4]
    for step, lr in lrs.items():  # the rate the step ran with (0-based iteration step − 1)
        expected = poly_warmup_lr(step - 1, recipe.lr, 4, warmup_iters=recipe.warmup_iters)
        assert lr == pytest.approx(expected, rel=1e-6), step
    evals = [step for step, v in logged if "eval/miou" in v]
    assert evals == [2, 4]  # periodic, then final
    scores = [v.get("eval/hiou", v["eval/miou"]) for _, v in logged if "eval/miou" in v]
    best = json.loads((out / "best" / "config.json").read_text())["card"]["metrics"]
    assert best.get("hiou", best["miou"]) == max(scores)  # hIoU: tiny is inductive
    meta = json.loads((out / "checkpoints" / "checkpoint_00000004" / "meta.json").read_text())
    # the last checkpoint is saved before the final evaluation: the best is still step 2's
    assert meta["best_step"] == 2 and meta["best_score"] == scores[0]
    reset_accelerate()  # resumed at step 2: reads stay at multiples of LOG_EVERY
    reads.clear()
    ckpt = out / "checkpoints" / "checkpoint_00000002"
    main(tiny_args(data, tmp_path / "resumed", "--max-iters", "4", "--no-eval",
                   "--resume-from", str(ckpt)))  # fmt: skip
    assert reads == [1, 1]


def test_the_best_model_stays_when_the_score_falls(tmp_path: Path, monkeypatch):
    """Periodic evaluations scoring 40, 55, 50, 55 (a tie), 30: ``<run>/best`` is exported at
    the first two only, and the state keeps 55 from step 4. hIoU decides; mIoU only without it."""
    import dataclasses

    import train.train as train_main
    from train.checkpoint import TrainState

    exported = []
    monkeypatch.setattr(
        train_main, "export_model",
        lambda acc, model, path, card: exported.append((path.name, card["metrics"])),
    )  # fmt: skip
    scores = iter([40.0, 55.0, 50.0, 55.0, 30.0])
    summaries = []

    def evaluate_at(model, step):
        summaries.append({"miou": 90.0 - step, "hiou": next(scores)})  # mIoU falls all along
        return summaries[-1]

    class Checkpoints:
        def save(self, state):
            return "saved"

    recipe = dataclasses.replace(
        load_recipe("tiny"), iterations=100, eval_every=2, checkpoint_interval=1000, keep_steps=()
    )
    hooks = train_main.StepHooks(
        Accelerator(cpu=True), torch.nn.Linear(1, 1), recipe, tmp_path, evaluate_at, Checkpoints()
    )
    state = TrainState()
    for step in range(1, 11):
        state.step = step
        hooks(state)
    assert [e[0] for e in exported] == ["best", "best"]
    assert [e[1] for e in exported] == summaries[:2]
    assert (state.best_score, state.best_step) == (55.0, 4)


def test_resume_keeps_the_best_score_even_when_the_batch_layout_changes():
    """A resumed run compares its evaluations with the best before the interruption (else it
    would overwrite ``<run>/best`` with a worse model)."""
    from accelerate import PartialState

    from train.checkpoint import TrainState
    from train.train import resume

    PartialState(cpu=True)  # Accelerate's logger needs it
    saved = TrainState(step=4, micro_step=8, per_device_batch=2, accumulation_steps=2,
                       best_score=55.0, best_step=2)  # fmt: skip

    class Checkpoints:
        folder = Path("run/checkpoints")

        def resolve(self, resume_from):
            return self.folder / "checkpoint_00000004"

        def load(self, path):
            return saved

    same = TrainState(per_device_batch=2, accumulation_steps=2)
    assert resume(Checkpoints(), "latest", same) == saved
    other = TrainState(num_processes=2, per_device_batch=2, accumulation_steps=1)
    state = resume(Checkpoints(), "latest", other)
    assert (state.step, state.micro_step, state.num_processes) == (4, 4, 2)
    assert (state.best_score, state.best_step) == (55.0, 2)


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_fully_supervised_run_reports_no_unseen_metrics(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """No unseen classes: no mIoU(unseen) or hIoU, never "nan" in the log, null (not NaN) in
    metrics.json, and the best model is chosen by mIoU."""
    from train.train import main

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        summary = main(tiny_args(data, out, "--max-iters", "2", "--eval-every", "1",
                                 "--set", "setting=fully"))  # fmt: skip
    assert set(summary) == {"miou", "miou_seen", "aacc"}
    log = caplog.text
    assert "hIoU n/a (no unseen classes)" in log and "mIoU(unseen)" not in log
    assert "nan" not in log.lower()
    metrics = _strict_json(out / "metrics.json")
    assert metrics["unseen"] == [] and metrics["hiou"] is None and metrics["miou"] is not None
    card = _strict_json(out / "model" / "config.json")["card"]["metrics"]
    assert card == summary and "hiou" not in (out / "model" / "README.md").read_text()
    kept = [float(x) for x in re.findall(r"best so far \(([\d.]+)\)", log)]  # by mIoU
    meta = _strict_json(out / "checkpoints" / "checkpoint_00000002" / "meta.json")
    assert meta["best_step"] == 1 and meta["best_score"] == kept[0]  # saved before the final eval
    assert _strict_json(out / "best" / "config.json")["card"]["metrics"]["miou"] == kept[-1]


def test_push_to_hub_offline_warns_at_start_keeps_the_export_and_exits_3(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from train.train import main

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        main(tiny_args(data, out, "--max-iters", "1", "--no-eval", "--push-to-hub", "me/tiny"))
    assert stop.value.code == 3  # not 0: a script can tell the upload failed
    assert "exits with status 3 if the upload fails" in caplog.text
    start = caplog.text.index("--push-to-hub me/tiny will fail: HF_HUB_OFFLINE=1")
    end = caplog.text.index("push to me/tiny failed")
    assert start < caplog.text.index("step 1: saved") < end
    assert f"the exported model in {out / 'model'} is intact" in caplog.text
    assert f"hf upload me/tiny {out / 'model'} --repo-type model" in caplog.text
    OTSeg.from_pretrained(out / "model")
    log = (out / "train.log").read_text()  # the warning came before the file: held, then written
    assert log.index("--push-to-hub me/tiny will fail") < log.index("step 1: saved")


def test_a_failed_push_is_the_exit_status_of_the_command(data: Path, tmp_path: Path):
    import subprocess

    from train_helpers import REPO, TRAIN, env

    out = tmp_path / "run"
    done = subprocess.run(
        TRAIN + tiny_args(data, out, "--max-iters", "1", "--no-eval", "--push-to-hub", "me/tiny"),
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"hf upload me/tiny {out / 'model'} --repo-type model" in done.stderr
    OTSeg.from_pretrained(out / "model")


def test_gradient_checkpointing_flag_reaches_the_model(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from train.train import main

    trained = []
    switch = OTSeg.set_grad_checkpointing
    monkeypatch.setattr(
        OTSeg, "set_grad_checkpointing", lambda m, on=True: trained.append(m) or switch(m, on)
    )
    main(tiny_args(data, tmp_path / "run", "--max-iters", "1", "--no-eval"))
    assert trained == []  # off unless asked
    reset_accelerate()
    main(tiny_args(data, tmp_path / "run2", "--max-iters", "1", "--no-eval",
                   "--gradient-checkpointing"))  # fmt: skip
    assert len(trained) == 1 and trained[0].image_encoder.grad_checkpointing


def test_custom_label_beyond_the_classes_stops_at_start(tmp_path: Path):
    from train.train import main

    root = write_synthetic(tmp_path / "shapes", "custom", num_train=4, num_val=1, num_classes=4)
    path = root / "labels/val/val_00000.png"
    label = read_label(path)
    label[3, 3] = 9
    Image.fromarray(label).save(path)
    args = tiny_args(root, tmp_path / "run", "--max-iters", "1", "--set", "dataset=custom",
                     "--set", "unseen_classes=['blue triangle']", "--set", "train_split=train")  # fmt: skip
    with pytest.raises(ValueError, match=r"val_00000.png: label value 9 but only 4 classes"):
        main(args)
    assert not (tmp_path / "run").exists()  # no folder, no train.log: it stopped at the checks
    reset_accelerate()
    main([*args, "--no-eval"])  # the validation split is not read without evaluation
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_built_in_dataset_labels_are_checked_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A VOC label value no conversion makes (30 > 20) stops the run before anything is built,
    naming the file, the value and the conversion; a sample of each split is read, every file
    with --check-all-labels."""
    import train.build
    from train.build import check_labels
    from train.train import main

    root = write_synthetic(tmp_path / "voc", "voc", num_train=4, num_val=2)
    path = root / "VOCdevkit/VOC2012/SegmentationClassAug/train_00001.png"  # trainaug index 5
    label = read_label(path)
    label[3, 3] = 30
    Image.fromarray(label).save(path)
    args = tiny_args(root, tmp_path / "run", "--max-iters", "1")
    with pytest.raises(
        ValueError, match=r"train_00001.png: label value 30 but only 20 classes.*voc_aug"
    ):
        main(args)
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(train.build, "LABEL_SAMPLE", 2)  # reads trainaug files 0 and 7
    recipe = load_recipe("tiny", [f"data_root={root}"])
    assert check_labels(recipe) == {"trainaug": (2, 8), "val": (2, 2)}
    assert check_labels(recipe, evaluate=False) == {"trainaug": (2, 8)}
    with pytest.raises(ValueError, match="label value 30"):
        check_labels(recipe, all_files=True)
    reset_accelerate()
    with pytest.raises(ValueError, match="label value 30"):
        main([*args, "--check-all-labels"])
    reset_accelerate()
    with caplog.at_level(logging.INFO):
        main([*args, "--no-eval"])  # the sample misses the file: training starts
    assert "label values checked: trainaug 2 of 8 files" in caplog.text


def test_missing_data_root_leaves_no_run_folder(tmp_path: Path):
    from train.train import main

    with pytest.raises(FileNotFoundError, match="not found") as err:
        main(tiny_args(tmp_path / "nowhere", tmp_path / "run", "--max-iters", "1"))
    assert f"python -m otseg.data.synthetic {tmp_path / 'nowhere'}" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_training_on_the_original_npy_embeddings(data: Path, tmp_path: Path):
    from train.train import main

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 3, 32)).astype(np.float16)  # (K, N, C) as the original files
    npy = tmp_path / "tiny_otseg.npy"
    np.save(npy, emb)
    out = tmp_path / "run"
    main(tiny_args(data, out, "--max-iters", "1", "--no-eval", "--set", f"text_embeddings={npy}"))
    bank = load_text_bank(out / "model" / "text_embeddings.safetensors")
    stored = torch.stack([bank[f"class{i}"] for i in range(5)])
    assert stored.dtype == torch.float16 and torch.equal(stored, torch.from_numpy(emb))
    reset_accelerate()
    # starting from that model (as from a converted original checkpoint) keeps its embeddings
    recipe = load_recipe("tiny", ["setting=transductive", f"init_from={out / 'model'}"])
    model = build_training_model(recipe, build_config(recipe))
    torch.testing.assert_close(model.training_text, torch.from_numpy(emb).float())
    with pytest.raises(FileNotFoundError, match="text_embeddings: no such file"):
        load_recipe("tiny", ["text_embeddings=/nowhere.npy"]).validate()


def test_stored_embeddings_win_over_the_clip_text_tower(tmp_path: Path):
    clip_dir = save_tiny_clip(tmp_path / "clip")
    recipe = load_recipe("tiny")
    config = build_config(recipe).replace(clip_model=f"local-dir:{clip_dir}", clip_pretrained=None)
    fresh = build_training_model(recipe, config)
    assert fresh.text.can_encode and not fresh.text.bank  # text from the tower
    bank = {n: torch.randn(3, 32).half() for n in config.class_names}
    fresh.text.bank = bank
    fresh.save_pretrained(tmp_path / "converted")  # a converted original: weights + embeddings
    recipe = load_recipe("tiny", [f"init_from={tmp_path / 'converted'}"])
    model = build_training_model(recipe, config)
    expected = torch.stack([bank[config.class_names[i]] for i in config.training_class_ids])
    torch.testing.assert_close(model.training_text, expected.float())


def test_local_clip_weights_file_and_offline_error(tmp_path: Path, monkeypatch):
    import open_clip

    b = save_tiny_clip(tmp_path / "b", seed=1)
    name = tmp_path / "cfg" / "otseg-test-tiny-clip.json"  # a named open_clip architecture
    name.parent.mkdir()
    name.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(name)
    config = build_config(load_recipe("tiny")).replace(clip_model=name.stem)
    clip, _ = load_frozen_clip(config, str(b / "open_clip_model.safetensors"))
    from safetensors.torch import load_file

    weights = load_file(str(b / "open_clip_model.safetensors"))
    assert torch.equal(clip.token_embedding.weight, weights["token_embedding.weight"])

    def offline(*args, **kwargs):
        raise WeightsNotFoundError("not in the Hugging Face cache and HF_HUB_OFFLINE=1")

    monkeypatch.setattr("otseg.weights.clip.load_clip", offline)
    with pytest.raises(WeightsNotFoundError, match=r"(?s)HF_HUB_OFFLINE.*--set clip_weights="):
        load_frozen_clip(build_config(load_recipe("voc-inductive")))


def test_step_timer_runs_the_training_step():
    from train.step_timer import synthetic_batch, time_training_step

    batch = synthetic_batch(2, 64, 5)
    assert batch["image"].shape == (2, 3, 64, 64)
    assert len(batch["label"][0].unique()) == 5  # 4 classes + ignore
    assert time_training_step("tiny", batch=2, cpu=True, steps=2, warmup=1, sinkhorn_iters=5) > 0


def test_step_timer_runs_zegot_in_each_transductive_phase(monkeypatch):
    from otseg.models.zegot import zegot_tiny_config
    from train import step_timer

    seen_text = []
    step = step_timer.train_step

    def spy(accelerator, model, optimizer, scheduler, data, objective, i, window):
        seen_text.append((i, objective.phase(i), len(objective.forward_text(i))))
        return step(accelerator, model, optimizer, scheduler, data, objective, i, window)

    monkeypatch.setattr(step_timer, "train_step", spy)
    config = zegot_tiny_config(setting="transductive")  # 5 classes, 3 seen; frozen copy to 50 %
    for at in (0, 3, 6):  # of 10 iterations: seen, frozen, self
        t = step_timer.time_training_step(
            config, batch=2, cpu=True, steps=1, warmup=0, sinkhorn_iters=3, at_step=at,
            iterations=10,
        )  # fmt: skip
        assert t > 0
    assert seen_text == [(0, "seen", 3), (3, "frozen", 5), (6, "self", 5)]
    assert step_timer.time_training_step("zegot-tiny", batch=2, cpu=True, steps=1, warmup=0) > 0


def test_tf32_only_on_cuda():
    from train.build import use_tf32

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        use_tf32(torch.device("cpu"))
        use_tf32(torch.device("cuda"), enabled=False)
        assert not torch.backends.cuda.matmul.allow_tf32
        use_tf32(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_sinkhorn_iters_applies_to_the_training_forward_only(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import otseg.nn.mps
    from train.train import main

    calls = []
    sinkhorn = otseg.nn.mps.sinkhorn

    def recording(cost, **kwargs):
        calls.append((kwargs["max_iter"], kwargs["tol"]))
        return sinkhorn(cost, **kwargs)

    monkeypatch.setattr(otseg.nn.mps, "sinkhorn", recording)
    out = tmp_path / "run"
    main(tiny_args(data, out, "--max-iters", "2", "--set", "sinkhorn_iters=3"))
    # one forward (MPS + 3 decoder layers) finds the unreached parameters, then 2 steps ×
    # 2 micro-batches train, then the evaluation
    assert set(calls[:4]) == {(100, 1e-6)}
    assert set(calls[4 : 4 + 2 * 2 * 4]) == {(3, None)}
    assert set(calls[4 + 2 * 2 * 4 :]) == {(100, 1e-6)}  # the evaluation keeps the original
    head = json.loads((out / "model" / "config.json").read_text())["config"]["head"]
    assert (head["sinkhorn_max_iter"], head["sinkhorn_thresh"]) == (100, 1e-6)


def test_push_problem_names_each_cause(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub
    from huggingface_hub import constants

    import otseg.weights.hub
    from train.export import push_problem

    assert "HF_HUB_OFFLINE=1" in push_problem("me/x")  # the test environment is offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "no Hugging Face token" in push_problem("me/x")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(otseg.weights.hub, "hub_unreachable_reason", lambda: "cannot reach the Hub")
    assert push_problem("me/x") == "cannot reach the Hub"
    monkeypatch.setattr(otseg.weights.hub, "hub_unreachable_reason", lambda: None)

    def rejected(self):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", rejected)
    assert "rejected the token (PermissionError: 401 Unauthorized)" in push_problem("me/x")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "me"})
    assert push_problem("me/x") is None
