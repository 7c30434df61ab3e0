"""Log-domain Sinkhorn for entropic optimal transport between pixels and prompts (spec §5)."""

from __future__ import annotations

import torch


def sinkhorn(
    cost: torch.Tensor,
    *,
    eps: float = 0.05,
    max_iter: int = 100,
    tol: float | None = 1e-6,
    return_iterations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Entropic transport plans with uniform marginals, batched over leading dimensions.

    Args:
        cost: (..., M, N) transport cost (1 − cosine similarity in OTSeg).
        eps: entropic regularisation ε.
        max_iter: maximum number of (u, v) update pairs.
        tol: stop once the mean of |u − u_prev| over *all* batch entries is below ``tol``,
            the original stopping rule (it reads the error on the host every iteration).
            ``None`` runs exactly ``max_iter`` iterations with no host synchronisation.
        return_iterations: also return the number of iterations run.

    Returns:
        (..., M, N) plan (float32; float64 for float64 costs) T = exp((−C + u + v)/ε) with row sums ≈ 1/M and column sums
        = 1/N (+1e-8); not rescaled. Gradients flow through every iteration.
    """
    *batch, m, n = cost.shape
    device_type = cost.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        c = (cost if cost.dtype == torch.float64 else cost.float()).reshape(-1, m, n)
        log_mu = torch.log(c.new_full((1, m), 1.0 / m) + 1e-8)
        log_nu = torch.log(c.new_full((1, n), 1.0 / n) + 1e-8)
        u = c.new_zeros(c.shape[0], m)
        v = c.new_zeros(c.shape[0], n)
        iterations = 0
        for iterations in range(1, max_iter + 1):  # noqa: B007 - read after the loop
            u_prev = u
            # Same operation order as the original ((−C + u) + v) / ε, for parity at 1e-7.
            u = eps * (log_mu - torch.logsumexp(_log_kernel(c, u, v, eps), dim=2)) + u
            v = eps * (log_nu - torch.logsumexp(_log_kernel(c, u, v, eps), dim=1)) + v
            if tol is not None and (u - u_prev).abs().mean().item() < tol:
                break
        plan = torch.exp(_log_kernel(c, u, v, eps)).reshape(*batch, m, n)
    if return_iterations:
        return plan, iterations
    return plan


def _log_kernel(c: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return (-c + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps
