"""Semantic matching guidance (MG): loss, closed-form gradients and the epsilon update (docs/method.md,
"Matching guidance").

Notation.  ComfyUI's epsilon models see ``x_in = x / sqrt(1 + sigma^2)``, which is the DDPM ``x_t`` with
``alpha_bar = 1 / (1 + sigma^2)``, and predict ``x0 = x - sigma * eps`` (identical to the official
``(x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``).

Official update (docs/method.md, "Matching guidance"): ``g = d loss / d x_in`` taken *only through eps*
(x_t detached, every
attention op under no_grad), then ``eps -= lambda_g * sqrt(1 - alpha_bar) * g``.  Because
``d x0 / d eps = -sigma``, ``g = -sigma * J^T grad_x0`` with ``J = d eps / d x_in``, and subtracting
``lambda * sqrt(1 - alpha_bar) * g`` moves x0 *down* the loss.  That "exact" mode needs a backward pass
through the UNet, which the caller does with autograd (:func:`eps_update` then applies it).

Fast mode (no UNet backward).  Assume the model's clean estimate does not react to its input
(``d x0_hat / d x_in = 0``), i.e. ``eps = (x_in - sqrt(alpha_bar) x0_hat) / sqrt(1 - alpha_bar)`` with
``x0_hat`` constant, so ``J = I / sqrt(1 - alpha_bar)``.  Then

* ``g_fast = -sigma / sqrt(1 - alpha_bar) * grad_x0 = -sqrt(1 + sigma^2) * grad_x0`` (:func:`fast_grad_x_in`),
* the official update becomes ``eps' = eps + lambda * sigma * grad_x0`` and
  ``x0' = x0 - lambda * sigma^2 * grad_x0`` (:func:`fast_guided_denoised`): plain gradient descent on the
  loss in latent space with step ``lambda * sigma^2``, same sign and scale convention as the official
  update.  The assumption is accurate at high noise (the denoiser's output barely depends on its input)
  and overestimates the pull at low noise, where the real ``J`` shrinks towards 0; but ``sigma^2`` is
  then small too.  ``lambda_g`` values tuned for the exact mode (50 / 75 in the paper) are therefore
  only a starting point for the fast mode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Variant",
    "matching_loss",
    "loss_grad_wrt_x0",
    "alpha_bar_from_sigma",
    "eps_update",
    "fast_grad_x_in",
    "fast_guided_denoised",
]

Variant = Literal["official", "paper"]


def _check(z0_tgt_pred: Tensor, z0_ref_warped: Tensor, weight: Tensor) -> None:
    if z0_tgt_pred.shape != z0_ref_warped.shape or z0_tgt_pred.dim() != 4:
        raise ValueError(
            "latents must be [B,C,H,W] of equal shape, got "
            f"{tuple(z0_tgt_pred.shape)} and {tuple(z0_ref_warped.shape)}"
        )
    if weight.dim() != 4 or weight.shape[1] != 1 or tuple(weight.shape[-2:]) != tuple(z0_tgt_pred.shape[-2:]):
        raise ValueError(f"weight must be [B,1,H,W] on the latent grid, got {tuple(weight.shape)}")
    if weight.shape[0] not in (1, z0_tgt_pred.shape[0]):
        raise ValueError("weight batch must be 1 or the latent batch")


def _safe_den(den: Tensor) -> Tensor:
    # Official: the division is skipped when the denominator is 0 (then the numerator is 0 as well).
    return torch.where(den > 0, den, torch.ones_like(den))


def matching_loss(
    z0_tgt_pred: Tensor, z0_ref_warped: Tensor, weight: Tensor, variant: Variant = "official"
) -> Tensor:
    """MG loss (scalar) between the target's predicted clean latent and the warped reference latent.

    ``weight`` ``[B,1,H,W]`` is ``m_t * U`` (soft mask times confidence).  Summed over the whole batch, as
    the official code does for its two (uncond, cond) items.

    * ``"official"`` (default): ``sum((w * (ref - x0))**2) / sum(w expanded over channels)``; the mask is
      applied *before* squaring (effective weight ``w**2``) while the denominator is linear in ``w``;
      a zero denominator skips the division (docs/method.md, "Matching guidance").
    * ``"paper"`` (Eq. 11 as described, per-pixel L2 norm): ``sum_p w_p * ||ref_p - x0_p||_2 / sum_p w_p``
      with the same zero guard.  The norm's gradient at a zero residual is taken as 0 (subgradient).
    """
    _check(z0_tgt_pred, z0_ref_warped, weight)
    diff = z0_ref_warped - z0_tgt_pred
    w = weight.to(diff.dtype)
    if variant == "official":
        num = ((w * diff) ** 2).sum()
        den = w.expand_as(diff).sum()
        return num / _safe_den(den)
    if variant == "paper":
        norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
        num = (w * norm).sum()
        den = w.expand_as(norm).sum()
        return num / _safe_den(den)
    raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")


def loss_grad_wrt_x0(
    z0_tgt_pred: Tensor, z0_ref_warped: Tensor, weight: Tensor, variant: Variant = "official"
) -> tuple[Tensor, Tensor]:
    """``(loss, d loss / d z0_tgt_pred)`` in closed form, without autograd.

    * official: ``2 w^2 (x0 - ref) / D`` with ``D = C * sum(w)`` (0 if ``D == 0``);
    * paper: ``w_p (x0_p - ref_p) / (||x0_p - ref_p|| * W)`` with ``W = sum(w)`` (0 where the residual or
      ``W`` is 0).
    Feed the gradient to :func:`fast_grad_x_in` / :func:`fast_guided_denoised` for the fast mode.
    """
    _check(z0_tgt_pred, z0_ref_warped, weight)
    with torch.no_grad():
        diff = z0_ref_warped - z0_tgt_pred
        w = weight.to(diff.dtype).expand(diff.shape[0], 1, *diff.shape[-2:])
        if variant == "official":
            den = _safe_den(w.expand_as(diff).sum())
            loss = ((w * diff) ** 2).sum() / den
            grad = -2.0 * (w * w) * diff / den
            return loss, grad
        if variant == "paper":
            norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
            den = _safe_den(w.sum())
            loss = (w * norm).sum() / den
            safe_norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            grad = torch.where(norm > 0, -w * diff / (safe_norm * den), torch.zeros_like(diff))
            return loss, grad
    raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")


def alpha_bar_from_sigma(sigma: Tensor | float) -> Tensor:
    """``alpha_bar = 1 / (1 + sigma^2)`` for ComfyUI's (k-diffusion) sigma of an epsilon model."""
    s = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    return 1.0 / (1.0 + s * s)


def _per_item(sigma: Tensor | float, like: Tensor) -> Tensor | float:
    """A scalar or a ``[B]`` sigma, shaped to broadcast over ``[B, ...]``."""
    if not isinstance(sigma, Tensor) or sigma.dim() == 0:
        return float(sigma)
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def eps_update(eps: Tensor, grad_x_in: Tensor, lambda_g: float, sigma: Tensor | float) -> Tensor:
    """Official MG update: ``eps - lambda_g * sqrt(1 - alpha_bar) * grad_x_in``.

    ``sqrt(1 - alpha_bar) = sigma / sqrt(1 + sigma^2)`` for ComfyUI's sigma.

    ``grad_x_in`` is ``d loss / d x_in`` through eps only (exact mode) or :func:`fast_grad_x_in`.
    """
    s = _per_item(sigma, eps)
    if isinstance(s, float):
        scale = s / math.sqrt(1.0 + s * s)
    else:
        scale = s / torch.sqrt(1.0 + s * s)
    return eps - float(lambda_g) * scale * grad_x_in


def fast_grad_x_in(grad_x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Fast-mode stand-in for ``d loss / d x_in``: ``-sqrt(1 + sigma^2) * grad_x0`` (module docstring)."""
    s = _per_item(sigma, grad_x0)
    if isinstance(s, float):
        return -math.sqrt(1.0 + s * s) * grad_x0
    return -torch.sqrt(1.0 + s * s) * grad_x0


def fast_guided_denoised(denoised: Tensor, grad_x0: Tensor, lambda_g: float, sigma: Tensor | float) -> Tensor:
    """Fast mode in denoised space: ``x0 - lambda_g * sigma^2 * grad_x0``.

    Equal to ``x - sigma * eps_update(eps, fast_grad_x_in(grad_x0, sigma), lambda_g, sigma)`` with
    ``x0 = x - sigma * eps``; handy for ComfyUI hooks that see denoised outputs rather than eps.
    """
    s = _per_item(sigma, denoised)
    return denoised - float(lambda_g) * (s * s) * grad_x0
