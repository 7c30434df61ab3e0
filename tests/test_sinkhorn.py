"""Sinkhorn: agreement with independent solvers, marginals, gradients, the original stop rule."""

from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn.functional as F

from factories import parity_fixture
from otseg.nn.sinkhorn import sinkhorn


def reference_loop(cost: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Independent float64 log-domain Sinkhorn written with numpy (one problem)."""
    m, n = cost.shape
    f, g = np.zeros(m), np.zeros(n)
    for _ in range(iters):
        f = eps * np.log(1 / m) - eps * np.logaddexp.reduce((g[None, :] - cost) / eps, axis=1)
        g = eps * np.log(1 / n) - eps * np.logaddexp.reduce((f[:, None] - cost) / eps, axis=0)
    return np.exp((f[:, None] + g[None, :] - cost) / eps)


def random_cost(b=3, m=64, n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sim = torch.nn.functional.normalize(torch.randn(b, m, 16, generator=g, dtype=dtype), dim=-1)
    proto = torch.nn.functional.normalize(torch.randn(b, n, 16, generator=g, dtype=dtype), dim=-1)
    return 1 - sim @ proto.transpose(1, 2)


def test_matches_pot_and_a_numpy_loop_when_converged():
    cost = random_cost()
    plan = sinkhorn(cost, eps=0.05, max_iter=2000, tol=None)
    for i in range(cost.shape[0]):
        c = cost[i].numpy()
        m, n = c.shape
        pot = ot.bregman.sinkhorn_log(
            np.full(m, 1 / m), np.full(n, 1 / n), c, 0.05, numItermax=5000, stopThr=1e-14
        )
        np.testing.assert_allclose(plan[i].numpy(), pot, atol=1e-9)
        np.testing.assert_allclose(plan[i].numpy(), reference_loop(c, 0.05, 2000), atol=1e-9)


def test_marginals():
    plan = sinkhorn(random_cost(dtype=torch.float32), max_iter=300, tol=None)
    m, n = plan.shape[-2:]
    torch.testing.assert_close(plan.sum(-2), torch.full((3, n), 1 / n), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(-1), torch.full((3, m), 1 / m), atol=1e-6, rtol=1e-3)


def test_gradients_flow_through_the_iterations():
    cost = random_cost(b=1, m=8, n=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, eps=0.5, max_iter=20, tol=None), (cost,))
    cost32 = random_cost(b=2, m=16, n=3, dtype=torch.float32).requires_grad_(True)
    (sinkhorn(cost32) * torch.randn(2, 16, 3)).sum().backward()
    assert cost32.grad is not None and cost32.grad.abs().sum() > 0


def test_runs_in_float32_under_autocast():
    """Autocast is switched off inside: the plan is the float32 plan, not one of bf16 GEMMs."""
    cost = random_cost(dtype=torch.bfloat16)
    want = sinkhorn(cost.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn(cost)
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan, want, atol=1e-9, rtol=1e-6)


def test_float32_costs_beyond_the_exp_range_take_the_log_domain():
    """At ε = 0.01 a cosine cost spans up to 200 nats. A pixel far from every prompt then has a
    kernel row exp(−C/ε) of float32 zeros (below e^−103) and the exp-domain iteration divides
    by zero. Both with the original stopping rule (domain read from the data) and with fixed
    iterations, the float32 plan must match POT's float64 log-domain solver."""
    eps, b, m, n = 0.01, 2, 24, 3
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(b, m, 8, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, n, 8, generator=g, dtype=torch.float64), dim=-1)
    x[:, 0] = F.normalize(-y.sum(1), dim=-1)  # a pixel far from every prompt
    x[:, 1] = y[:, 0]  # and one on a prompt
    cost = 1 - x @ y.transpose(1, 2)
    row_min = cost.amin(-1)  # the far pixel's row lies entirely below float32's range
    assert ((row_min.amax(-1) - row_min.amin(-1)) / eps > 104).all()
    want = np.stack([
        ot.bregman.sinkhorn_log(
            np.full(m, 1 / m), np.full(n, 1 / n), c.numpy(), eps, numItermax=1000,
            stopThr=1e-15, warn=False,
        )
        for c in cost
    ])  # fmt: skip
    fixed = sinkhorn(cost.float(), eps=eps, max_iter=300, tol=None)
    np.testing.assert_allclose(fixed.numpy(), want, atol=2e-6, rtol=0)
    ruled, iterations = sinkhorn(
        cost.float(), eps=eps, max_iter=1000, tol=1e-8, return_iterations=True
    )
    assert iterations < 1000
    np.testing.assert_allclose(ruled.numpy(), want, atol=2e-6, rtol=0)


def test_stopping_rule_is_the_original_batch_global_mean():
    cost = random_cost(b=4, m=256, n=6, dtype=torch.float32)
    plan, n = sinkhorn(cost, return_iterations=True)
    assert 1 < n < 100
    fixed = sinkhorn(cost, max_iter=n, tol=None, cost_range=2.0)  # same (exp) domain
    torch.testing.assert_close(plan, fixed, atol=0, rtol=0)
    # the stop tests the mean error of the whole batch, not each member's
    counts = [sinkhorn(cost[i : i + 1], return_iterations=True)[1] for i in range(4)]
    assert min(counts) <= n <= max(counts)


def test_iteration_counts_of_the_original_on_the_fixture():
    """The parity README records 15, 16, 19 and 26 iterations for the four crop calls."""
    ref = torch.load(parity_fixture("tiny_voc_inductive") / "outputs.pt", weights_only=True)
    counts = []
    for i in range(4):
        plan, n = sinkhorn(ref[f"sinkhorn.{i}.cost"], return_iterations=True)
        counts.append(n)
        torch.testing.assert_close(plan, ref[f"sinkhorn.{i}.T"], atol=2e-7, rtol=0)
    assert counts == [15, 16, 19, 26]


def test_log_domain_fallback_for_extreme_cost_ranges():
    """Costs spanning more than e^80 at this ε use the log domain and still match POT."""
    cost = random_cost(b=1, m=32, n=4) * 3.0
    cost[0, 0, 0], cost[0, 1, 1] = 0.0, 6.0  # a range of 6 / 0.05 = 120 nats > 80
    plan = sinkhorn(cost, eps=0.05, max_iter=3000, tol=None)
    c = cost[0].numpy()
    pot = ot.bregman.sinkhorn_log(
        np.full(32, 1 / 32), np.full(4, 1 / 4), c, 0.05, numItermax=5000, stopThr=1e-14
    )
    np.testing.assert_allclose(plan[0].numpy(), pot, atol=1e-9)
    small = sinkhorn(random_cost(b=2, m=16, n=3), eps=0.05, max_iter=500, tol=None, cost_range=2)
    from otseg.nn import sinkhorn as module

    neg = -random_cost(b=2, m=16, n=3) / 0.05
    log_plan, _ = module._log_domain(
        neg, neg.amax(dim=(1, 2), keepdim=True), 16, 3, 0.05, 500, None
    )
    torch.testing.assert_close(small, log_plan, atol=1e-12, rtol=1e-9)


def test_fixed_iterations_never_read_the_data_on_the_host():
    """Meta tensors have no values: any host read (``.item()``, ``bool``) raises. Fixed
    iterations run on them in both domains; the original stopping rule cannot."""
    import pytest

    cost = torch.empty(2, 5, 1024, 6, device="meta")
    for cost_range in (2.0, None):  # exp domain chosen from the bound / log domain
        plan, n = sinkhorn(
            cost, max_iter=4, tol=None, cost_range=cost_range, return_iterations=True
        )
        assert plan.shape == cost.shape and n == 4
    with pytest.raises((RuntimeError, NotImplementedError)):
        sinkhorn(cost, max_iter=4)


def test_domain_from_a_cost_bound_equals_the_data_choice():
    cost = random_cost(b=3, m=128, n=6, dtype=torch.float32)
    for tol in (1e-6, None):
        torch.testing.assert_close(
            sinkhorn(cost, tol=tol, cost_range=2.0), sinkhorn(cost, tol=tol), atol=1e-7, rtol=1e-5
        )
