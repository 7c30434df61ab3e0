"""End-to-end smoke test of ``main([...])``, the transductive setting (explicit inductive start,
pseudo-labels only on unseen pixels), configs from a custom dataset, and evaluation errors."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from train_helpers import reset_accelerate, tiny_args

from otseg.data.synthetic import SYNTHETIC_CLASSES, write_synthetic
from otseg.errors import UserError
from otseg.models.otseg import OTSeg
from otseg.nn.losses import IGNORE, pseudo_label, remap_labels
from train.build import build_config, build_training_model
from train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data"), "voc", num_train=8, num_val=2)


def test_main_smoke_then_transductive_from_it(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from train.train import main

    inductive = tmp_path / "inductive"
    summary = main(tiny_args(data, inductive, "--max-iters", "4", "--checkpoint-every", "2"))
    assert set(summary) == {"miou", "miou_seen", "miou_unseen", "hiou", "aacc"}
    assert (inductive / "model" / "model.safetensors").is_file()
    assert json.loads((inductive / "recipe.json").read_text())["iterations"] == 4
    reset_accelerate()

    st = ["--set", "setting=transductive", "--max-iters", "2", "--no-eval"]
    with pytest.raises(ValueError, match="--init-from"):
        main(tiny_args(data, tmp_path / "st", *st))
    reset_accelerate()
    # a checkpoint folder works as the start point (as the original's iter_10000)
    start = inductive / "checkpoints" / "checkpoint_00000002"
    with caplog.at_level(logging.INFO):
        main(tiny_args(data, tmp_path / "st", *st, "--init-from", str(start)))
    model = OTSeg.from_pretrained(tmp_path / "st" / "model")
    assert model.config.setting == "transductive" and model.config.calibration == 0.0
    assert model.training_text.shape[0] == len(model.config.class_names)  # all classes
    # which model the run started from is logged and recorded with the run
    resolved = str((start / "model").resolve())
    recipe = json.loads((tmp_path / "st" / "recipe.json").read_text())
    assert recipe["init_from"] == str(start)
    assert (recipe["init_from_resolved"], recipe["init_from_step"]) == (resolved, 2)
    training = json.loads((tmp_path / "st" / "model" / "config.json").read_text())["card"]
    assert training["training"]["init_from_resolved"] == resolved
    assert f"from {resolved} (step 2)" in (tmp_path / "st" / "train.log").read_text()
    reset_accelerate()
    # a run folder: the recipe's init_from_iter picks the checkpoint; the final model: its steps
    main(tiny_args(data, tmp_path / "st2", *st, "--init-from", str(inductive), "--set",
                   "init_from_iter=4"))  # fmt: skip
    recipe = json.loads((tmp_path / "st2" / "recipe.json").read_text())
    assert recipe["init_from_resolved"].endswith("checkpoint_00000004/model")
    assert recipe["init_from_step"] == 4
    assert "init_from_resolved" not in json.loads((inductive / "recipe.json").read_text())


def test_init_from_loads_the_inductive_weights(data: Path, tmp_path: Path):
    from train.train import main

    ind = tmp_path / "ind"
    main(tiny_args(data, ind, "--max-iters", "4", "--checkpoint-every", "2", "--no-eval"))
    # a run folder with a final model and checkpoints: which one the protocol means is unclear
    recipe = load_recipe("tiny", ["setting=transductive", f"init_from={ind}"])
    with pytest.raises(ValueError, match=r"ambiguous.*steps \[2, 4\]"):
        build_training_model(recipe, build_config(recipe))
    # the recipe's init_from_iter names the inductive step the protocol starts from
    recipe = dataclasses.replace(recipe, init_from_iter=2)
    model = build_training_model(recipe, build_config(recipe))
    source = OTSeg.from_pretrained(ind / "checkpoints" / "checkpoint_00000002" / "model")
    for key, value in source.trained_state_dict().items():
        assert torch.equal(model.trained_state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match=r"step 3, but .*checkpoint_00000003"):
        build_training_model(dataclasses.replace(recipe, init_from_iter=3), build_config(recipe))
    final = OTSeg.from_pretrained(ind / "model")  # an explicit model folder is taken as is
    recipe = dataclasses.replace(recipe, init_from=str(ind / "model"))
    model = build_training_model(recipe, build_config(recipe))
    for key, value in final.trained_state_dict().items():
        assert torch.equal(model.trained_state_dict()[key], value), key


def test_a_missing_init_from_is_one_line_naming_it(tmp_path: Path):
    from train.build import resolve_init

    with pytest.raises(UserError, match=r"^init_from .*runs/x: no such directory; give the run"):
        resolve_init(tmp_path / "runs" / "x", step=2)


def test_keep_steps_survive_rotation(data: Path, tmp_path: Path):
    from train.train import main

    run = tmp_path / "ind"
    main(tiny_args(data, run, "--max-iters", "5", "--checkpoint-every", "1", "--no-eval",
                   "--keep-checkpoints", "2", "--set", "keep_steps=[2]"))  # fmt: skip
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000005"]


def test_pseudo_labels_touch_only_unseen_pixels():
    recipe = load_recipe("tiny", ["setting=transductive"])
    config = build_config(recipe)
    assert config.unseen == (1, 3) and config.calibration == 0.0
    model = build_training_model(recipe, config)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = IGNORE
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 64), model.training_text)
    targets = pseudo_label(remap_labels(labels, config), output, config)
    unseen = (labels == 1) | (labels == 3)
    assert torch.equal(targets[~unseen], labels[~unseen])  # seen ids and ignore untouched
    assert set(targets[unseen].unique().tolist()) <= {1, 3}  # an unseen class, from the model
    inductive = pseudo_label(
        remap_labels(labels, config.replace(setting="inductive")),
        output,
        config.replace(setting="inductive"),
    )
    assert (inductive[unseen] == IGNORE).all()


def test_custom_dataset_config(tmp_path: Path):
    root = write_synthetic(tmp_path / "shapes", "custom", num_train=4, num_val=2, num_classes=4)
    recipe = load_recipe(
        "tiny", ["dataset=custom", f"data_root={root}", "unseen_classes=['blue triangle']"]
    )
    config = build_config(recipe)
    assert config.class_names == SYNTHETIC_CLASSES[:4] and config.unseen == (2,)
    assert config.seen == (0, 1, 3) and config.dataset == "shapes"
    fully = build_config(
        load_recipe("tiny", ["dataset=custom", f"data_root={root}", "setting=fully"])
    )
    assert fully.unseen == () and fully.seen == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="not in"):
        build_config(
            load_recipe("tiny", ["dataset=custom", f"data_root={root}", "unseen_classes=['cat']"])
        )


def test_config_flag_accepts_a_path_without_suffix():
    from train.train import build_recipe, parse_args

    args = parse_args(
        ["--config", "train/configs/voc-inductive", "--data-root", "/d", "--max-iters", "7"]
    )
    recipe = build_recipe(args)
    assert recipe.name == "voc-inductive" and recipe.data_root == "/d" and recipe.iterations == 7


def test_cross_dataset_evaluation_needs_a_text_tower(data: Path, tmp_path: Path):
    from train.evaluate import main as evaluate_main
    from train.train import main

    main(tiny_args(data, tmp_path / "run", "--max-iters", "1", "--no-eval"))
    reset_accelerate()
    with pytest.raises(SystemExit, match="no text tower"):
        evaluate_main(["--model", str(tmp_path / "run" / "model"), "--dataset", "voc",
                       "--data-root", str(data), "--cpu"])  # fmt: skip
