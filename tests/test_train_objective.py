"""What the training step optimises: the mask-count normaliser of a whole optimizer step (the
original's 4-GPU objective on any layout), the decoder's initialisation, the fp32 similarity
under autocast, sync-free mask counting and the fixed-iteration Sinkhorn switch."""

from __future__ import annotations

import pytest
import torch
from train_helpers import reset_accelerate

from otseg.nn.losses import IGNORE, count_masks, otseg_losses, pseudo_label, remap_labels
from otseg.nn.mps import cosine_similarity
from otseg.nn.mpsa import fixed_sinkhorn
from train.build import build_config, build_training_model
from train.engine import StepWindow, train_step
from train.objective import OTSegObjective
from train.recipe import load_recipe

# The original's early stop is global over a batch, so 2 images per forward would stop at
# another iteration than 1 image: a fixed count makes the comparison independent of batching.
ITERS = 30


@pytest.fixture(scope="module")
def setup():
    recipe = load_recipe("tiny")
    config = build_config(recipe)

    def model():  # the same weights every call (seeded); eval: no dropout, comparable runs
        return build_training_model(recipe, config).eval()

    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 64, 64, generator=g)
    labels = torch.full((4, 64, 64), IGNORE)
    labels[0, :20] = 0  # images with 1, 3, 0 and 2 classes: different mask counts
    labels[1, :10], labels[1, 10:30], labels[1, 40:] = 2, 4, 0
    labels[3, :, :30], labels[3, :, 30:] = 0, 2
    return config, model, images, labels


def reference_grads(model, config, images, labels) -> dict[str, torch.Tensor]:
    """The original on 4 GPUs × 1 image: each GPU's loss ÷ max(1, mean count over GPUs),
    gradients averaged by DDP."""
    model = model()
    losses, counts = [], []
    for i in range(4):
        with fixed_sinkhorn(model, ITERS):
            out = model(images[i : i + 1], model.training_text.detach())
        targets = pseudo_label(remap_labels(labels[i : i + 1], config), out, config)
        losses.append(otseg_losses(out, targets, num_masks=1.0)["loss"])
        counts.append(count_masks(targets))
    mean_count = torch.stack(counts).mean().clamp(min=1.0)
    (torch.stack(losses).sum() / mean_count / 4).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def our_grads(model, config, images, labels, per_device: int) -> dict[str, torch.Tensor]:
    """The gradients the optimizer receives in one step of ``train_step`` on one process with
    accumulation."""
    from accelerate import Accelerator

    reset_accelerate()
    model = model()
    names = {id(p): n for n, p in model.named_parameters()}
    received = {}

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                received.update(
                    {names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None}
                )

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4 // per_device)
    optimizer = Recording([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    window, logs, objective = StepWindow(), None, OTSegObjective(model)
    for i in range(0, 4, per_device):
        batch = {"image": images[i : i + per_device], "label": labels[i : i + per_device]}
        assert logs is None
        with fixed_sinkhorn(model, ITERS):
            logs = train_step(accelerator, model, optimizer, scheduler, batch, objective, 0, window)
    assert logs is not None and logs["num_masks"].item() == 6  # 1 + 3 + 0 + 2
    assert type(logs["lr"]) is float  # known on the host: never copied to the device
    reset_accelerate()
    return received


def test_one_process_with_accumulation_optimises_the_original_4_gpu_objective(setup):
    config, model, images, labels = setup
    ref = reference_grads(model, config, images, labels)
    for per_device in (1, 2):  # 1 × 4 accumulated, 2 × 2 accumulated
        ours = our_grads(model, config, images, labels, per_device)
        assert set(ours) == set(ref)
        for name, grad in ref.items():
            torch.testing.assert_close(ours[name], grad, rtol=1e-3, atol=1e-6)


def test_window_logs_the_step_normalised_losses(monkeypatch: pytest.MonkeyPatch):
    window = StepWindow()

    class Single:
        device = torch.device("cpu")
        num_processes = 1

        def reduce(self, tensor, op):
            return tensor

    window.add({"loss": torch.tensor(6.0), "acc_seg": torch.tensor(50.0)}, torch.tensor(1.0))
    window.add({"loss": torch.tensor(2.0), "acc_seg": torch.tensor(100.0)}, torch.tensor(3.0))
    with monkeypatch.context() as m:  # no value read back or copied in from the host (a sync)
        for name in ("item", "tolist", "new_tensor", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"Tensor.{name}"))
        logs = window.reduce(Single(), min_masks=1.0)
    assert logs["loss"].item() == 2.0 and logs["acc_seg"].item() == 75.0  # 8 / 4 masks
    assert logs["num_masks"].item() == 4.0 and window.count == 0


def test_count_masks_without_host_sync_matches_unique():
    targets = torch.randint(0, 6, (3, 16, 16))
    targets[targets == 5] = IGNORE
    targets[2] = IGNORE
    expected = sum(int((t.unique() != IGNORE).sum()) for t in targets)
    assert count_masks(targets).item() == expected


def test_decoder_layers_start_as_identical_copies(setup):
    torch.manual_seed(0)
    model = build_training_model(load_recipe("tiny"), setup[0])
    first, *others = model.decoder.layers
    for layer in others:
        for (name, a), b in zip(
            first.state_dict().items(), layer.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
        assert layer.linear1.weight.data_ptr() != first.linear1.weight.data_ptr()  # not shared


def test_similarity_stays_float32_under_bf16_autocast():
    pixels, queries = torch.randn(1, 20, 32), torch.randn(1, 3, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = cosine_similarity(pixels @ torch.eye(32), queries)  # a bf16 matmul input
        assert (pixels @ torch.eye(32)).dtype == torch.bfloat16
    assert sim.dtype == torch.float32
    exact = cosine_similarity(pixels.bfloat16().float(), queries)
    torch.testing.assert_close(sim, exact, rtol=0, atol=1e-6)


def test_fixed_sinkhorn_runs_exactly_n_iterations_and_restores(setup):
    config, make_model, images, _ = setup
    model = make_model()
    original = model.config
    with fixed_sinkhorn(model, 3):
        assert model.config.head.sinkhorn_thresh is None
        assert model.config.head.sinkhorn_max_iter == 3
        assert all(
            layer.multihead_attn.cfg.sinkhorn_max_iter == 3 for layer in model.decoder.layers
        )
        with torch.no_grad():
            fixed = model(images[:1], model.training_text).decoder_map
    assert model.config is original
    assert all(layer.multihead_attn.cfg is original.head for layer in model.decoder.layers)
    with torch.no_grad():
        converged = model(images[:1], model.training_text).decoder_map
    assert not torch.equal(fixed, converged)  # 3 iterations are not the converged plan


def test_only_parameters_no_training_map_reaches_are_frozen():
    """OTSeg's last decoder layer updates queries nobody reads: its value, output projection,
    FFN and norms are frozen, nothing else; every trainable ZegOT parameter (the prompt vectors,
    reached through the text) keeps training."""
    from factories import tiny_model
    from otseg.models.zegot import build_zegot, zegot_tiny_config
    from train.build import freeze_unreached

    model = tiny_model().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unreached = freeze_unreached(model)
    last = f"decoder.layers.{len(model.decoder.layers) - 1}."
    assert all(n.startswith(last) for n in unreached)
    parts = {n.removeprefix(last).rsplit(".", 1)[0] for n in unreached}
    assert parts == {
        "multihead_attn.v",
        "multihead_attn.proj",
        "linear1",
        "linear2",
        "norm2",
        "norm3",
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable - set(unreached)
    assert all(p.grad is None for p in model.parameters())
    zegot = build_zegot(zegot_tiny_config(setting="transductive")).train()
    assert freeze_unreached(zegot) == [] and zegot.prompts.ctx.requires_grad
