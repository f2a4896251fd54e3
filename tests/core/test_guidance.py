"""Tests for dreammatcher_core.guidance: loss variants, closed-form gradients, epsilon updates."""

from __future__ import annotations

import math

import pytest
import torch

from dreammatcher_core import guidance as G


def _data(seed: int, b: int = 2, c: int = 3, h: int = 4, w: int = 5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    ref = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    weight[0, 0, 0, :2] = 0.0
    return x0, ref, weight


def _central_diff(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = f(x).item()
        flat[i] = old - eps
        down = f(x).item()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradients_match_central_finite_differences(variant):
    x0, ref, weight = _data(0)
    loss, grad = G.loss_grad_wrt_x0(x0, ref, weight, variant)
    torch.testing.assert_close(loss, G.matching_loss(x0, ref, weight, variant))
    fd = _central_diff(lambda t: G.matching_loss(t, ref, weight, variant), x0.clone())
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    # autograd agrees as well, w.r.t. both latents
    assert torch.autograd.gradcheck(
        lambda a, b: G.matching_loss(a, b, weight, variant),
        (x0.clone().requires_grad_(True), ref.clone().requires_grad_(True)),
    )
    x = x0.clone().requires_grad_(True)
    G.matching_loss(x, ref, weight, variant).backward()
    torch.testing.assert_close(x.grad, grad)


def test_official_loss_hand_example():
    # one pixel-row: C=2, w = [1, 0.5]; residuals ref - x0 = [[1, 2], [3, 4]] (channel, pixel)
    x0 = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    ref = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], dtype=torch.float64)
    w = torch.tensor([[[[1.0, 0.5]]]], dtype=torch.float64)
    # numerator: (1*1)^2 + (0.5*2)^2 + (1*3)^2 + (0.5*4)^2 = 1 + 1 + 9 + 4 = 15; denominator 2 * 1.5 = 3
    assert G.matching_loss(x0, ref, w, "official").item() == pytest.approx(5.0)
    # paper: (1*sqrt(1+9) + 0.5*sqrt(4+16)) / 1.5
    expect_paper = (math.sqrt(10) + 0.5 * math.sqrt(20)) / 1.5
    assert G.matching_loss(x0, ref, w, "paper").item() == pytest.approx(expect_paper)
    assert G.matching_loss(x0, ref, w).item() == pytest.approx(5.0)  # default is official


def test_zero_weight_guard_gives_zero_not_nan():
    x0, ref, _ = _data(1)
    w = torch.zeros(2, 1, 4, 5, dtype=torch.float64)
    for variant in ("official", "paper"):
        loss, grad = G.loss_grad_wrt_x0(x0, ref, w, variant)
        assert loss.item() == 0.0 and torch.all(grad == 0)
        x = x0.clone().requires_grad_(True)
        G.matching_loss(x, ref, w, variant).backward()
        assert torch.isfinite(x.grad).all() and torch.all(x.grad == 0)
    with pytest.raises(ValueError):
        G.matching_loss(x0, ref, w, "other")  # type: ignore[arg-type]


def test_paper_gradient_is_zero_at_zero_residual():
    x0, _, w = _data(2)
    loss, grad = G.loss_grad_wrt_x0(x0, x0.clone(), w, "paper")
    assert loss.item() == 0.0 and torch.isfinite(grad).all() and torch.all(grad == 0)


@pytest.mark.parametrize("sigma", [0.3, 2.0, 14.6])
def test_fast_mode_equals_official_gradient_for_insensitive_denoiser(sigma):
    """With eps = (x_in - sqrt(abar) c) / sqrt(1 - abar) (denoiser ignores its input), the official gradient
    through eps (x_t detached) equals the fast closed form, and both updates agree in denoised space."""
    x0_hat_c, ref, weight = _data(3)
    abar = G.alpha_bar_from_sigma(sigma).item()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * sigma
    x_in = (x / math.sqrt(1 + sigma**2)).requires_grad_(True)
    eps = (x_in - math.sqrt(abar) * x0_hat_c) / math.sqrt(1 - abar)
    # official x0 with x_t detached: the gradient flows through eps only
    x0 = x_in.detach() / math.sqrt(abar) - math.sqrt(1 - abar) / math.sqrt(abar) * eps
    torch.testing.assert_close(x0.detach(), x - sigma * eps.detach())  # = ComfyUI's denoised
    loss = G.matching_loss(x0, ref, weight)
    (g_exact,) = torch.autograd.grad(loss, x_in)
    _, grad_x0 = G.loss_grad_wrt_x0(x0.detach(), ref, weight)
    g_fast = G.fast_grad_x_in(grad_x0, sigma)
    torch.testing.assert_close(g_fast, g_exact)
    lam = 0.5
    new_eps = G.eps_update(eps.detach(), g_fast, lam, sigma)
    torch.testing.assert_close(x - sigma * new_eps, G.fast_guided_denoised(x0.detach(), grad_x0, lam, sigma))
    # the update moves x0 down the loss
    small = G.fast_guided_denoised(x0.detach(), grad_x0, 1e-3 / sigma**2, sigma)
    assert G.matching_loss(small, ref, weight) < loss.detach()


def test_per_item_sigma_broadcasts():
    eps = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    sig = torch.tensor([1.0, 3.0], dtype=torch.float64)
    out = G.eps_update(eps, g, 2.0, sig)
    for i in range(2):
        one = G.eps_update(eps[i : i + 1], g[i : i + 1], 2.0, float(sig[i]))
        torch.testing.assert_close(out[i : i + 1], one)
    torch.testing.assert_close(G.fast_grad_x_in(g, sig)[1], -math.sqrt(10.0) * g[1])
