"""What DreamMatcher costs on top of plain ComfyUI sampling (``make bench``).

Everything runs in one process against the *same* model, seed, latent and schedule, and each
method is reported as a ratio to plain ComfyUI sampling (``comfy.sample.sample``, DDIM) measured
in the same run:

* ``vanilla``      stock sampling, the baseline;
* ``ama``          the model patched by ``DM_AMAPatch`` (reference pass + matching + AMA), no bank;
* ``ama-lowrank``  ``ama`` with the low-rank PCA solver (Feature Settings' ``pca_solver``);
* ``ama-bank``     the same with the reference bank, after one untimed sampling that fills it (what
                   every later generation with that reference costs);
* ``vanilla-batch4`` / ``ama-batch4``  a batch of four targets sharing one reference (no bank);
                   ``ama-batch4``'s ratio is to ``vanilla-batch4``, i.e. per image;
* ``mg-fast``      ``DM_MatchingGuidanceSampler`` in fast mode on the AMA-patched model;
* ``mg-exact``     the same in exact mode (a UNet backward per guided step);
* ``invert``       one-off ``DM_InvertReference`` (inversion + reconstruction check).

Model: a random-weight UNet with the SD1.5 block layout at reduced width (``--width``, default
the "narrow" 320/1,1,1,1 variant the e2e tier uses), so the attention layers, resolutions and token
counts are SD1.5's. Memory is the sampled resident-set high-water mark above the RSS right before
each run (psutil, 2 ms period); on a GPU it is ``torch.cuda.max_memory_allocated`` above the
allocation before the run.

``--layout sd15`` / ``--layout sdxl`` use the *full* SD1.5 / SDXL UNet layouts instead (channel
multipliers, transformer depths, context and ADM sizes of the real models; ``--width`` still sets the
base channel count, 320 for the real sizes). ``benchmarks/gpu_check.py`` drives ``measure`` with these
on a GPU (fp16 weights, a warm-up run of every method, a time budget).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "host"))

from testing_pack.tiny_models import init_weights  # noqa: E402

#: UNet layouts. "narrow" is the SD1.5 layout at channel_mult 1,1,1,1 (the e2e tier's model); "sd15" and
#: "sdxl" are the full layouts as ``comfy.model_detection`` detects them for the real checkpoints.
LAYOUTS: dict[str, dict] = {
    "narrow": dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, out_channels=4,
        num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 1, 1, 1],
        transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
        use_temporal_resblock=False, use_temporal_attention=False,
    ),
    "sd15": dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, num_res_blocks=[2, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
        use_linear_in_transformer=False, context_dim=768, num_heads=8,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_temporal_attention=False, use_temporal_resblock=False,
    ),
    "sdxl": dict(
        use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
        num_classes="sequential", adm_in_channels=2816, in_channels=4, num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        use_temporal_attention=False, use_temporal_resblock=False,
    ),
}
#: SDXL's pooled CLIP-G embedding, part of its ADM conditioning.
SDXL_POOLED_DIM = 1280
METHODS = ("vanilla", "invert", "ama", "ama-lowrank", "ama-bank", "vanilla-batch4", "ama-batch4", "mg-fast",
           "mg-exact")
#: The method each ratio is taken against (default: ``vanilla``).
BASELINES = {"ama-batch4": "vanilla-batch4"}
#: Bank budget of ``ama-bank`` (MiB): enough for every step of the benchmark's sizes.
BANK_MIB = 8192


def boot(tmp: Path, extras: bool = True):
    """Start ComfyUI in-process (temp dirs) and load this pack; return the pack's module name.

    ``extras=False`` skips ComfyUI's ``comfy_extras`` node files (the pack needs none of them; their
    optional dependencies, e.g. kornia or spandrel, may be missing on a bare GPU image).
    """
    from comfy_env import boot_in_process, put_comfy_first_on_path

    put_comfy_first_on_path()
    import torch
    from comfy.cli_args import args

    return boot_in_process(tmp, cpu=args.cpu or not torch.cuda.is_available(), extras=extras)[2]


def init_weights_on_device(model, seed: int) -> None:
    """``init_weights``' seeded initialisation drawn from a generator on the parameters' own device.

    Same distributions as the host tier's ``init_weights`` (which draws on the CPU and copies): used
    for models built directly on a GPU, where drawing billions of numbers on the CPU would dominate.
    """
    import torch

    params = sorted(model.named_parameters())
    dev = params[0][1].device
    if dev.type == "cpu":
        init_weights(model, seed)
        return
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if p.ndim == 1:
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, device=dev) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, device=dev) / fan_in**0.5)


def build_model(width: int, seed: int = 0, layout: str = "narrow", dtype=None, build_on_device: bool = False):
    """A seeded random-weight ``ModelPatcher`` of the given UNet layout (see ``LAYOUTS``).

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere. ``build_on_device`` allocates and initialises
    the weights on the load device (fast for the full layouts on a GPU); otherwise they are built on
    the CPU with the host tier's ``init_weights`` and moved by ComfyUI's model management.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = dict(LAYOUTS[layout], model_channels=width)
    mc = (comfy.supported_models.SDXL if layout == "sdxl" else comfy.supported_models.SD15)(cfg)
    dev = comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=dev if build_on_device else torch.device("cpu"))
    init_weights_on_device(model, seed)  # comfy ops leave torch.empty
    model.to(dtype)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, dev, offload)


def make_cond(seed: int, layout: str = "narrow", size: int = 256) -> list:
    """A CONDITIONING without CLIP: seeded token embeddings (plus SDXL's pooled/size conds)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = LAYOUTS[layout]["context_dim"]
    extra = {}
    if layout == "sdxl":
        extra = {"pooled_output": torch.randn(1, SDXL_POOLED_DIM, generator=g), "width": size, "height": size}
    return [[torch.randn(1, 77, ctx, generator=g), extra]]


class Scenario:
    """The inputs every sampling benchmark feeds a model: a reference latent to invert, the target latent,
    seeded conditionings (target positive and negative, reference positive) and the subject match.

    WHY one place: ``make bench`` and ``make syncs`` must measure the same sampling, so they build it
    here rather than each keeping a copy that could drift.
    """

    def __init__(self, pack: str, layout: str = "narrow", size: int = 256, batch: int = 1) -> None:
        import torch

        lat = size // 8
        gen = torch.Generator().manual_seed(1)
        self.pack = pack
        self.ref_latent = {"samples": torch.randn(1, 4, lat, lat, generator=gen) * 0.8}
        self.target = {"samples": torch.zeros(batch, 4, lat, lat)}
        self.positive, self.negative, self.ref_positive = (make_cond(s, layout, size) for s in (2, 3, 4))
        self.match = _dm(pack, "nodes.config").MatchConfig(subject="sks dog", subject_tokens=(4, 5))

    def sample(self, model, steps: int, latent=None):
        """Stock ``comfy.sample.sample``: DDIM, ``ddim_uniform``, cfg 7.5, seed 0."""
        import comfy.sample

        x = self.target["samples"] if latent is None else latent
        noise = comfy.sample.prepare_noise(x, 0)
        return comfy.sample.sample(model, noise, steps, 7.5, "ddim", "ddim_uniform", self.positive,
                                   self.negative, x, seed=0, disable_pbar=True)

    def guided(self, patched, reference, steps: int, mode: str):
        """The Matching Guidance Sampler on ``patched`` at λg 50, same settings as :meth:`sample`."""
        guidance = _dm(self.pack, "nodes.node_guidance").MatchingGuidanceSampler
        return guidance.execute(patched, reference, 0, steps, 7.5, "ddim_uniform", self.positive,
                                self.negative, self.target, 1.0, 50.0, 0.08, 1.0, mode, match=self.match)


def _dm(pack: str, sub: str):
    return importlib.import_module(f"{pack}.{sub}")


class PeakMemory:
    """Peak memory above the level at ``__enter__`` (CUDA allocator, or sampled RSS on CPU)."""

    def __enter__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.peak = self.base
            self.stop = False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.extra = max(0, self.peak - self.base)


def measure(pack: str, width=320, size=256, steps=10, repeats=2, batch=1, *, layout="narrow", dtype=None,
            build_on_device=False, warmup_all=False, deadline=None, methods=METHODS, log=print,
            model=None, seed=0, record_errors=False):
    """Time and measure every method against vanilla sampling of the same model in this process.

    ``pack`` is the module name ``boot`` returned. Returns ``{"results": {name: {...}}, "context": {...}}``.
    Each result holds the per-run times, their median, the peak extra memory (bytes) and, for the
    samplers, the output latent of the last run. ``warmup_all`` runs every method once untimed first;
    without it only vanilla is warmed up, as ``make bench`` always did (a whole timed round, printed,
    then discarded). ``deadline`` (a ``time.perf_counter()`` value) skips the methods and repeats that
    would not end before it, judged by the method's last run. ``model`` reuses a built ModelPatcher.
    ``record_errors`` stores a method's exception as ``{"error": ...}`` and goes on with the next one.
    """
    import torch

    dm = lambda sub: _dm(pack, sub)  # noqa: E731

    if model is None:
        model = build_model(width, seed, layout, dtype, build_on_device)
    lat = size // 8
    sc = Scenario(pack, layout, size, batch)
    ref_latent, tgt_latent, match = sc.ref_latent, sc.target, sc.match
    pos, neg, ref_pos = sc.positive, sc.negative, sc.ref_positive
    config = dm("nodes.config")
    cuda = torch.cuda.is_available() and model.load_device.type == "cuda"

    results: dict[str, dict] = {}
    out_holder: dict[str, object] = {}
    base: dict[str, int] = {}

    def run_once(fn) -> tuple[float, int]:
        with PeakMemory() as pm:
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        base["bytes"] = pm.base
        return dt, pm.extra

    def timed(name, fn, warmup: bool):
        if deadline is not None and time.perf_counter() >= deadline:
            log(f"  {name:10s} skipped (time budget)")
            results[name] = {"skipped": "time budget"}
            return
        if not record_errors:
            _timed(name, fn, warmup)
            return
        try:
            _timed(name, fn, warmup)
        except Exception as exc:  # noqa: BLE001 - reported, the next method still runs
            import traceback

            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            out_holder.pop("out", None)
            log(f"  {name:10s} FAILED: {type(exc).__name__}: {exc}")

    def _timed(name, fn, warmup: bool):
        times, mem, warm_s = [], 0, None
        if warmup:
            warm_s, _ = run_once(fn)
        last = warm_s
        for _ in range(repeats):
            if deadline is not None and times and time.perf_counter() + (last or 0.0) > deadline:
                break
            dt, extra = run_once(fn)
            times.append(dt)
            last = dt
            mem = max(mem, extra)
        med = statistics.median(times)
        results[name] = {"times_s": times, "median_s": med, "peak_extra_bytes": mem, "warmup_s": warm_s,
                         "base_bytes": base.get("bytes"), "out": out_holder.pop("out", None)}
        log(f"  {name:10s} {med:8.2f} s   peak extra {mem / 2**20:8.1f} MiB")

    invert = dm("nodes.node_invert").InvertReference
    holder = {}

    def do_invert():
        holder["ref"] = invert.execute(model, ref_latent, ref_pos, steps=steps, scheduler="ddim_uniform",
                                       cfg=1.0)[0]

    def plain_sample(m, x=None):
        out_holder["out"] = sc.sample(m, steps, x)

    def do_vanilla():
        plain_sample(model)

    log(f"DreamMatcher sampling benchmark: {_layout_name(layout, width)}, {size}x{size} px, "
        f"batch {batch}, {steps} DDIM steps, cfg 7.5, device {model.load_device}, "
        f"torch threads {torch.get_num_threads()}")
    batch4 = torch.zeros(4 * batch, 4, lat, lat)
    if warmup_all:
        timed("vanilla", do_vanilla, warmup=True)  # the warm-up also loads the model
    else:  # make bench's historical warm-up: a full timed round, printed, then discarded
        timed("vanilla", do_vanilla, warmup=False)
        results.pop("vanilla")
        timed("vanilla", do_vanilla, warmup=False)
    timed("invert", do_invert, warmup=warmup_all)
    ref = holder.get("ref")
    patched = banked = lowrank = None
    if ref is not None:
        patched = dm("nodes.ama").patch_model(model, ref, 1.0, 0.08, 1.0, match=match)
        lowrank = dm("nodes.ama").patch_model(model, ref, 1.0, 0.08, 1.0, match=match,
                                              features=config.feature_config(pca_solver="lowrank"))
        banked = dm("nodes.ama").patch_model(model, ref, 1.0, 0.08, 1.0, match=match, bank_mib=BANK_MIB)

    def do_ama():
        plain_sample(patched)

    def do_mg(mode):
        out_holder["out"] = sc.guided(patched, ref, steps, mode)[0]["samples"]

    samplers = (("ama", do_ama, False), ("ama-lowrank", lambda: plain_sample(lowrank), False),
                ("ama-bank", lambda: plain_sample(banked), True),
                ("vanilla-batch4", lambda: plain_sample(model, batch4), warmup_all),
                ("ama-batch4", lambda: plain_sample(patched, batch4), warmup_all),
                ("mg-fast", lambda: do_mg("fast"), False), ("mg-exact", lambda: do_mg("exact"), False))
    for name, fn, warm in samplers:
        if name not in methods:
            continue
        if patched is None and name != "vanilla-batch4":
            results[name] = {"skipped": "no reference (invert skipped)"}
            log(f"  {name:10s} skipped (no reference)")
            continue
        timed(name, fn, warmup=warm or warmup_all)  # ama-bank: the warm-up run fills the bank
        if name == "ama-bank" and "median_s" in results.get(name, {}):
            st = dm("nodes.ama").patch_of(banked).last_stats
            bank = dm("nodes.ama").patch_of(banked).bank
            results[name].update(bank_hits=st.get("bank_hits"), ref_passes=st.get("ref_passes"),
                                 bank_mib=round(bank.nbytes / 2**20, 1))
            log(f"  {'':10s} bank: {st.get('bank_hits')} replayed passes, {st.get('ref_passes')} live, "
                f"{bank.nbytes / 2**20:.1f} MiB held")
    for name, base_name in BASELINES.items():
        if name in results:
            results[name]["baseline"] = base_name

    context = {"model": model, "patched": patched, "reference": ref, "positive": pos, "negative": neg,
               "target_latent": tgt_latent, "match": match, "steps": steps, "size": size, "layout": layout}
    return {"results": results, "context": context}


def _layout_name(layout: str, width: int) -> str:
    if layout == "narrow":
        return f"SD1.5 layout width {width}"
    return f"full {'SD1.5' if layout == 'sd15' else 'SDXL'} layout width {width}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="narrow",
                    help="UNet layout: narrow SD1.5 (default), full sd15 or full sdxl")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench.json"),
                    help="where the JSON rows go")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (vanilla always runs)")
    ap.add_argument("--warmup-all", action="store_true", help="run every method once untimed first")
    a = ap.parse_args()

    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = measure(boot(tmp), a.width, a.size, a.steps, a.repeats, a.batch, layout=a.layout,
                  warmup_all=a.warmup_all, methods=methods, log=lambda s: print(s, flush=True))
    results = {k: v for k, v in out["results"].items() if "median_s" in v}
    rows = table_rows(results)
    print()
    print("| method | time (s) | × plain sampling | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        per = " per image" if row["baseline"] != "vanilla" else ""
        print(f"| {row['method']} | {row['median_s']:.2f} | {row['ratio']:.2f}{per} | "
              f"{row['peak_extra_mib']:.0f} |")
    print(f"\n(ratios are wall time / plain sampling's wall time in the same run, median of {a.repeats} "
          "runs; ama-batch4 is against vanilla-batch4, i.e. per image)")
    import json
    import platform

    import torch

    dest = Path(a.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": str(out["context"]["model"].load_device)}
    setup = {"layout": _layout_name(a.layout, a.width), "size": a.size, "steps": a.steps, "batch": a.batch,
             "repeats": a.repeats, "bank_mib": BANK_MIB}
    dest.write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=1) + "\n")
    print(f"wrote {dest}")


def table_rows(results: dict) -> list[dict]:
    """One row per measured method: ratio to its baseline (``BASELINES``, else vanilla) and memory."""
    rows = []
    for name, r in results.items():
        base = results.get(BASELINES.get(name, "vanilla"))
        if base is None:
            continue
        row = {"method": name, "baseline": BASELINES.get(name, "vanilla"),
               "median_s": round(r["median_s"], 3), "times_s": [round(t, 3) for t in r["times_s"]],
               "ratio": round(r["median_s"] / base["median_s"], 3),
               "peak_extra_mib": round(r["peak_extra_bytes"] / 2**20, 1)}
        row.update({k: r[k] for k in ("bank_hits", "ref_passes", "bank_mib") if k in r})
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
