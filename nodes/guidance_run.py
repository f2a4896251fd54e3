"""One sampling run of matching guidance: the guided model call of each step, per branch.

:class:`GuidanceRun` is built inside the sampler function (:mod:`.guidance`). On a guided step it
evaluates the cond and uncond branches, finds the correspondence (the AMA patch's when the MODEL
carries one at the latent grid, else its own from this step's decoder features) and adds the guidance
update to each branch's prediction *before* CFG, in ``exact`` mode (a UNet backward through eps) or
``fast`` mode (closed form). The equations are in ``docs/method.md`` ("Matching guidance").
"""

from __future__ import annotations

import torch

from ..dreammatcher_core import features as dmf
from ..dreammatcher_core import guidance as dmg
from ..dreammatcher_core import matching as dmm
from ..dreammatcher_core.trajectory import same_sigma
from . import ama as ama_api
from . import layout
from .capture import FeatureTap
from .host import autograd, hooks, sampling
from .host import model as host_model


def guidance_window(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_high, sigma_low): a step at sigma is guided when sigma_low <= sigma <= sigma_high.

    ComfyUI's percent convention (as ControlNet's start/end): 0.08 of a 50-step ddim_uniform
    schedule first guides official step 4 (t=901), exactly the official ``mg_initial_step``.
    """
    return host_model.window_sigmas(model_sampling, start_percent, end_percent)


class GuidanceRun:
    """Per-sampling-run state of the guidance sampler (built inside the sampler function)."""

    def __init__(self, spec, model_k, x: torch.Tensor, extra_args: dict) -> None:
        self.spec = spec
        self.guider, self.base, self.model_patcher = sampling.sampler_parts(model_k)
        self.device = x.device
        self.seed = extra_args.get("seed")
        self.window = guidance_window(self.base.model_sampling, spec.start_percent, spec.end_percent)
        # The same per-layout default and validation the AMA patch and the inspector use.
        self.layers = layout.feature_layers(host_model.unet_layout(self.model_patcher), spec.feature_layers)
        self.calc = sampling.calc_cond_batch
        self._ref_conds: list | None = None
        self.last: dict = {}
        self.batch = x.shape[0]
        self.inner_calc = None
        self.source = "own"
        #: Where the reference features of the sampler's own matching came from: "ama" (the AMA
        #: run's reference pass of this step) or "pass" (a reference pass of its own).
        self.ref_source = "pass"
        self.own_ref_passes = 0

    def active(self, sigma: float) -> bool:
        hi, lo = self.window
        return self.spec.scale != 0.0 and lo <= sigma <= hi and sigma > 0.0

    # -- reference side ---------------------------------------------------------------------------
    def ref_conds(self, ref_x: torch.Tensor) -> list:
        """The reference's own conditioning, processed once per run like ComfyUI's (cond, uncond)."""
        if self._ref_conds is None:
            ref = self.spec.reference
            done = sampling.process_conds(self.base, ref_x, ref.positive or None, ref.negative or None,
                                          self.device, seed=self.seed)
            # Fallback when the reference carries no conditioning of a kind: the target's own.
            own = sampling.guider_conds(self.guider)
            self._ref_conds = [done.get("positive", own.get("positive")),
                               done.get("negative", own.get("negative"))]
        return self._ref_conds

    def reference_features(self, sigma: float, branches: list[int], model_options: dict) -> dict:
        """Decoder features of the reference latent at ``sigma`` with its own prompts, per branch."""
        traj = self.spec.reference.trajectory
        ref_x = traj.at(sigma).to(self.device)
        conds = self.ref_conds(ref_x)
        tap = FeatureTap(self.layers)
        mo = hooks.with_output_patch(ama_api.without_run(model_options), tap)
        run = [conds[k] if k in branches else None for k in (0, 1)]
        sig = torch.full((ref_x.shape[0],), sigma, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            self.calc(self.base, run, ref_x, sig, mo)
        return tap.feats

    # -- correspondence ---------------------------------------------------------------------------
    def correspondence(self, sigma: float, branch: int, tgt_feats: dict | None, ref_feats: dict | None,
                       model_options: dict, hw: tuple[int, int]):
        """(flow_t2r [B,2,H,W], weight [B,1,H,W]) at the latent grid for one branch.

        ``model_options`` are the step's own, without the target feature tap: a reference pass made
        here must not overwrite the target features the tap holds.

        Reuses the AMA patch's current-step correspondence when the MODEL carries it; otherwise
        matches decoder descriptors of this step (the current step's features, as the official
        guidance does).
        """
        shared = _ama_correspondence(model_options, sigma, branch, hw, self.batch)
        self.source = "ama" if shared is not None else "own"
        if shared is not None:
            self.ref_source = "none"
            return shared
        if ref_feats is None:
            # With the AMA patch (which did not match at the latent grid, e.g. SDXL), its reference
            # pass of this step already holds the reference features: no second reference pass.
            shared_feats = ama_api.reference_features(model_options, sigma, branch, tuple(self.layers))
            if shared_feats is not None:
                ref_feats = {branch: shared_feats}
                self.ref_source = "ama"
            else:
                ref_feats = self.reference_features(sigma, [branch], model_options)
                self.ref_source = "pass"
                self.own_ref_passes += 1
        tf, rf = tgt_feats[branch], ref_feats[branch]
        n_ref = next(iter(rf.values())).shape[0]
        b = next(iter(tf.values())).shape[0]
        idx = torch.arange(b) % n_ref  # target row i is matched to reference row i % N
        ref_hw = tuple(self.spec.reference.trajectory.shape[-2:])
        desc_r, desc_t = dmf.describe([rf[k][idx].float() for k in self.layers],
                                      [tf[k].float() for k in self.layers], pca_dim=self.spec.pca_dim,
                                      grid_ref=ref_hw, grid_tgt=tuple(hw), pca_solver=self.spec.pca_solver)
        flow, back = dmm.argmax_flows(desc_t, desc_r)
        fg = torch.ones(b, 1, *hw, device=flow.device)
        conf = dmm.confidence(dmm.cycle_error(flow, back), fg, self.spec.lambda_c)
        return flow, fg * conf

    def targets(self, flow: torch.Tensor, dtype) -> torch.Tensor:
        """The warped clean reference latent z0 for each target row (reference row = row % N).

        Every flow here comes straight from an argmax (this run's or the AMA patch's), so it is
        integral: the warp is told so instead of checking the values, which on a GPU would stall the CPU
        twice per guided branch.
        """
        z0 = self.spec.reference.trajectory.z0.to(self.device, dtype)
        idx = torch.arange(flow.shape[0]) % z0.shape[0]
        return dmm.warp(z0[idx], flow.to(self.device), integral=True).to(dtype)

    # -- the guided model call --------------------------------------------------------------------
    def calc_cond_batch(self, args: dict) -> list:
        """``sampler_calc_cond_batch_function`` used on guided steps: guidance per branch, pre-CFG."""
        sampling.throw_if_interrupted()
        conds, x, ts, mo = args["conds"], args["input"], args["sigma"], args["model_options"]
        sigma = float(ts.reshape(-1)[0])
        branches = [k for k in (0, 1) if k < len(conds) and conds[k] is not None]
        inner = self.inner_calc

        def forward(which: list, x_in: torch.Tensor, options: dict) -> list:
            if inner is not None:
                return inner({**args, "conds": which, "input": x_in, "model_options": options})
            return self.calc(self.base, which, x_in, ts, options)

        self.batch = x.shape[0]
        # With the AMA patch the reference pass is the patch's; the own one runs only if needed.
        ama = ama_api.get_run(mo) is not None
        layers_tap = FeatureTap(self.layers)
        run_mo = hooks.with_output_patch(mo, layers_tap)
        ref_feats = None if ama else self.reference_features(sigma, branches, mo)
        hw = (x.shape[-2], x.shape[-1])
        x_det = x.detach()
        out = [None] * len(conds)
        parts: dict[int, tuple] = {}
        if self.spec.mode == "exact":
            out, grads, denom, parts_exact = self._exact(conds, x_det, sigma, forward, mo, run_mo, layers_tap,
                                                         ref_feats, hw)
            # denoised_k += lambda * sigma^2 * dL/dx_k (derivation at the top of this section), where
            # L = sum_k loss_k * D_k / D is the official loss over both branches (D_k = sum of w_k).
            step = self.spec.scale * sigma * sigma
            for k in branches:
                share = denom[k] / max(sum(denom.values()), 1e-30)
                update = (step * share) * grads[k].to(out[k].dtype)
                self._observe(k, sigma=sigma, x=x_det, denoised=out[k], update=update, grad=grads[k],
                              share=share, **parts_exact.pop(k))
                out[k] = out[k] + update
        else:
            # Fast mode (dreammatcher_core.guidance, module docstring): no UNet backward. The clean
            # estimate is taken as constant in the input, so d eps / d x = I / sigma and the official
            # update becomes plain descent on the loss in latent space, x0 -= lambda * sigma^2 * dL/dx0,
            # with dL/dx0 in closed form over both branches together (one loss, as the official code).
            with torch.no_grad():
                out = list(forward(list(conds), x_det, run_mo))
            for k in branches:
                flow, w = self.correspondence(sigma, k, layers_tap.feats, ref_feats, mo, hw)
                parts[k] = (flow, w, self.targets(flow, torch.float32), self.source)
            _, g0 = dmg.loss_grad_wrt_x0(torch.cat([out[k].float() for k in branches]),
                                         torch.cat([parts[k][2] for k in branches]),
                                         torch.cat([parts[k][1].float() for k in branches]), "official")
            for k, g0_k in zip(branches, g0.split(x.shape[0]), strict=True):
                guided = dmg.fast_guided_denoised(out[k].float(), g0_k, self.spec.scale, sigma)
                update = guided.to(out[k].dtype) - out[k]
                flow, w, target, source = parts[k]
                self._observe(k, sigma=sigma, x=x_det, denoised=out[k], update=update, flow=flow, weight=w,
                              target=target, source=source)
                out[k] = out[k] + update
        self.last = {"sigma": sigma, "branches": branches}
        return out

    def _observe(self, branch: int, **info) -> None:
        if self.spec.probe is not None:
            self.spec.probe({"mode": self.spec.mode, "branch": branch, "source": self.source,
                             "ref_source": self.ref_source, "own_ref_passes": self.own_ref_passes, **info})

    def _exact(self, conds, x_det, sigma, forward, mo, run_mo, tap, ref_feats, hw):
        """Per branch: grad forward on the target rows only, numerator loss, backward, free the graph.

        Approximation choices (``docs/method.md``, "Matching guidance", exact mode):
        * the gradient flows through eps only: x0 = x_detached - sigma * eps(x_in), as the official code;
        * unlike the official code, attention is *not* excluded from the gradient (ComfyUI gives no
          per-call no_grad around attention without replacing other packs' attention patches); the
          gradient is the true d eps / d x of the model as patched;
        * only the target rows enter the graph (the reference pass, if any, runs without grad);
        * the official loss spans both branches with one denominator; the weights are constant in x, so
          each branch's own loss is differentiated separately and rescaled by its share of the
          denominator, and the graph of one branch is freed before the next (bounded memory).
        """
        out = [None] * len(conds)
        grads: dict[int, torch.Tensor] = {}
        parts: dict[int, dict] = {}
        denom: dict[int, float] = {}
        model = self.base.diffusion_model
        for k in (0, 1):
            if k >= len(conds) or conds[k] is None:
                continue
            which = [conds[j] if j == k else None for j in range(len(conds))]
            with autograd.grad_escape(model):
                x_in = x_det.clone().requires_grad_(True)
                den = forward(which, x_in, run_mo)[k]
                eps = (x_in - den) / sigma
                x0 = x_det - sigma * eps
                flow, w = self.correspondence(sigma, k, tap.feats, ref_feats, mo, hw)
                work = torch.promote_types(x0.dtype, torch.float32)  # float64 runs stay float64
                target = self.targets(flow, work)
                loss = dmg.matching_loss(x0.to(work), target, w.to(work), "official")
                (g,) = torch.autograd.grad(loss, x_in)
                out[k] = den.detach()
                grads[k] = g.detach()
                denom[k] = float(w.sum())
                del x_in, den, eps, x0, loss, g
            parts[k] = {"flow": flow, "weight": w, "target": target, "source": self.source}
            if self.spec.probe is not None:
                def branch_denoised(x_new, which=which, k=k):
                    with torch.no_grad():
                        return forward(which, x_new, run_mo)[k]
                parts[k]["forward"] = branch_denoised
        for k in range(len(conds)):
            if out[k] is None:
                out[k] = torch.zeros_like(x_det)
        return out, grads, denom, parts


def _ama_correspondence(model_options: dict, sigma: float, branch: int, hw: tuple[int, int], batch: int):
    """(flow_t2r, mask * confidence) of the AMA patch for this step at the latent grid, or None.

    Uses the AMA package's ``current_correspondence`` per target row. The AMA correspondence is built
    from the previous step's features (the AMA timing) and the subject's soft mask; it is only reused
    when it belongs to *this* step's sigma and exists at the latent grid (SD1.5 layout: decoder 64² =
    latent). Otherwise the caller matches on its own.
    """
    if ama_api.get_run(model_options) is None:
        return None
    flows, weights = [], []
    for r in range(batch):
        m = ama_api.current_correspondence(model_options, chunk_type=branch, row=r, resolution=hw)
        if m is None or m.confidence is None or m.mask is None or not same_sigma(m.sigma, sigma):
            return None
        flows.append(m.flow_t2r)
        weights.append((m.mask * m.confidence).detach())
    return torch.cat(flows), torch.cat(weights)
