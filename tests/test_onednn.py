"""otseg.nn.onednn.Linear: nn.Linear's result through oneDNN for CPU fp32 inference only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import skip_or_fail
from otseg.nn import onednn

if not onednn.AVAILABLE:  # CI runs on x86-64 with the pinned CPU torch: there it must run
    skip_or_fail(
        "no oneDNN path here (not x86-64, OTSEG_ONEDNN=0, or no oneDNN in torch)",
        allow_module_level=True,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_nn_linear_and_follows_its_weights(bias):
    torch.manual_seed(0)
    ours, ref = onednn.Linear(48, 80, bias=bias), nn.Linear(48, 80, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        with torch.no_grad():
            ref.weight.mul_(-2.0)
        ours.load_state_dict(ref.state_dict())  # an in-place copy: the packed weight is rebuilt
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_linear_takes_onednn_only_for_cpu_fp32_inference(monkeypatch):
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    layer = onednn.Linear(16, 16)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16  # autocast's own bf16 GEMM
    assert len(calls) == 1
    y = layer(x.requires_grad_())
    y.sum().backward()  # autograd: F.linear
    assert len(calls) == 1 and layer.weight.grad is not None


def test_concurrent_first_calls_build_once():
    import threading
    import time

    owner, weight = nn.Linear(4, 4), torch.randn(4, 4)
    builds, start = [], threading.Barrier(4)

    def build():
        builds.append(1)
        time.sleep(0.05)  # every other thread arrives while this one builds
        return "packed"

    def call():
        start.wait()
        return onednn.cached(owner, torch.float32, [weight], build)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert onednn.cached(owner, torch.float32, [weight], build) == "packed" and len(builds) == 1
    weight.add_(1.0)  # contents changed: built again
    assert onednn.cached(owner, torch.float32, [weight], build) == "packed" and len(builds) == 2


def test_otseg_onednn_0_turns_the_path_off():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import otseg.nn.onednn as o; print(o.AVAILABLE)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-c", code]
    off = subprocess.run(run, env={**env, "OTSEG_ONEDNN": "0"}, capture_output=True, text=True)
    on = subprocess.run(run, env={**env, "OTSEG_ONEDNN": ""}, capture_output=True, text=True)
    assert off.stdout.strip() == "False" and on.stdout.strip() == str(onednn.AVAILABLE)
