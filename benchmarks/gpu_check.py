"""One-shot GPU check of the pack: environment, CUDA parity, and cost vs plain ComfyUI sampling.

Meant to run once on a rented GPU machine through ``benchmarks/gpu_check.sh`` (which installs the
carried wheels and tees the log), inside a hard time budget. Every section records its result, or
its error, in ``<out>/gpu_check.json`` as soon as it ends, so a run that is cut off still reports
what it did. Nothing here changes the pack; it only drives it.

Sections
--------
1. ``env``: Python, torch, CUDA device, ComfyUI version, attention / matmul settings, imported
   third-party distributions (and whether PyAV is real or the import stub below).
2. ``parity``:
   a. ``DM_AMAPatch`` with strength 0 vs stock ``KSampler`` (ddim, ddim_uniform) on the tiny SD1.5
      and SDXL layouts in float32 on the device: ``torch.equal``;
   b. ``DM_MatchingGuidanceSampler`` with guidance_scale 0 vs stock ``KSampler`` ddim: ``torch.equal``;
   c. ``dreammatcher_core.matching.argmax_flows`` and ``cycle_error`` on the same seeded descriptors on
      the CPU and the device (float32 and float16 inputs; random, near-duplicate and tie-heavy
      descriptors; the device's screened path and its exact float64 path).
   Stock sampling is also run twice, to tell a nondeterministic device from a real parity break.
3. ``bench``: ``bench_sampling.measure`` on the full SD1.5 UNet layout (random seeded weights, fp16,
   512x512) and, when enough budget is left, the full SDXL layout (1024x1024, fewer steps): vanilla,
   invert, AMA, mg-fast, mg-exact, each warmed up once and timed (median), with the peak CUDA
   allocation above the allocation before each run; every figure also as a ratio to vanilla sampling
   of the same model in the same run. Strength-0 / scale-0 parity is re-checked on the fp16 model.

``--smoke`` (with ``--cpu`` or on a machine without CUDA) runs the same code paths at toy sizes, to
prove the script end to end before the one GPU run.

PyAV: ComfyUI 0.3.75's ``comfy_api.latest`` imports ``av`` at import time (video I/O types), and
the PyAV wheel (35 MB, bundled FFmpeg) is too large to carry. When ``import av`` fails, a stub
package is installed whose attributes are placeholder classes that raise on use. Nothing on the
sampling path uses PyAV; the JSON says whether the stub was used.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "host"))


# ------------------------------------------------------------------------------------------ helpers
def elapsed() -> float:
    return time.perf_counter() - T0


def tree_hash() -> str:
    """sha1 over the pack's Python sources (ties a device run to the working tree it was given)."""
    import hashlib

    h = hashlib.sha1()
    files = [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py")),
             *sorted((REPO / "dreammatcher_core").glob("*.py"))]
    for f in files:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def install_av_stub() -> str:
    """Make ``import av`` (and any ``av.x.y``) succeed when PyAV is missing; return what was used."""
    try:
        import av

        return f"real {getattr(av, '__version__', '?')}"
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    import importlib.abc
    import importlib.machinery
    import types

    def _raise(*_a, **_k):
        raise ImportError("PyAV is not installed here (benchmarks/gpu_check.py import stub)")

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Meta(name, (), {"__init__": _raise, "__module__": cls.__module__})

    class _StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = _Meta(name, (), {"__init__": _raise, "__module__": self.__name__})
            setattr(self, name, value)
            return value

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "av" or fullname.startswith("av."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = _StubModule(spec.name)
            mod.__path__ = []
            mod.open = _raise
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())
    return f"stub ({reason})"


class Report:
    """The JSON report, rewritten (atomically) after every section."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {"sections": {}, "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str = "") -> None:
        print(f"[{elapsed():6.1f}s] {msg}" if msg else "", flush=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(elapsed(), 2)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.out / "gpu_check.json")

    @contextlib.contextmanager
    def section(self, name: str):
        t = time.perf_counter()
        rec: dict = {}
        self.data["sections"][name] = rec
        self.log(f"== {name}")
        try:
            yield rec
            rec["status"] = rec.get("status", "ok")
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()
            self.data["errors"].append(f"{name}: {rec['error']}")
            self.log(f"!! {name} FAILED: {rec['error']}")
            print(rec["traceback"], flush=True)
        finally:
            rec["seconds"] = round(time.perf_counter() - t, 2)
            self.save()


def _jsonable(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist() if o.numel() <= 16 else f"<tensor {tuple(o.shape)} {o.dtype}>"
        if isinstance(o, torch.dtype | torch.device):
            return str(o)
    except ImportError:  # pragma: no cover
        pass
    return repr(o)


def tensor_summary(t) -> dict:
    import torch

    t = t.detach().float().cpu()
    finite = torch.isfinite(t)
    return {"shape": list(t.shape), "finite": bool(finite.all()), "nonfinite": int((~finite).sum()),
            "abs_max": float(t[finite].abs().max()) if bool(finite.any()) else None,
            "sum": float(t[finite].double().sum())}


def compare(a, b) -> dict:
    """torch.equal plus, when different, how different (NaNs compared as equal in ``equal_nan``)."""
    import torch

    a, b = a.detach().cpu(), b.detach().cpu()
    eq = bool(torch.equal(a, b))
    res = {"equal": eq}
    if not eq and a.shape == b.shape:
        both_nan = torch.isnan(a) & torch.isnan(b)
        res["equal_nan"] = bool(((a == b) | both_nan).all())
        d = (a.double() - b.double()).abs()
        d = d[torch.isfinite(d)]
        res["max_abs_diff"] = float(d.max()) if d.numel() else None
        res["n_diff"] = int(((a != b) & ~both_nan).sum())
    return res


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ sections
def section_env(rec: dict, av_state: str, smoke: bool) -> None:
    import importlib.metadata as md

    import comfy.model_management as mm
    import torch

    rec["python"] = sys.version.split()[0]
    rec["executable"] = sys.executable
    rec["platform"] = platform.platform()
    rec["torch"] = torch.__version__
    rec["torch_cuda"] = torch.version.cuda
    rec["cuda_available"] = torch.cuda.is_available()
    rec["smoke"] = smoke
    dev = mm.get_torch_device()
    rec["comfy_device"] = str(dev)
    rec["comfy_device_name"] = mm.get_torch_device_name(dev)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec["device_name"] = p.name
        rec["capability"] = f"{p.major}.{p.minor}"
        rec["sm_count"] = p.multi_processor_count
        rec["total_memory_mib"] = p.total_memory // 2**20
        rec["cudnn"] = torch.backends.cudnn.version()
    else:
        rec["device_name"] = "cpu"
        rec["torch_threads"] = torch.get_num_threads()
    try:
        import comfyui_version

        rec["comfyui"] = comfyui_version.__version__
    except ImportError:
        rec["comfyui"] = "unknown"
    rec["comfyui_path"] = os.environ.get("COMFYUI_PATH", str(REPO / ".host" / "comfyui"))
    rec["av"] = av_state
    rec["vram_state"] = str(getattr(mm, "vram_state", "?"))
    rec["pytorch_attention"] = bool(getattr(mm, "ENABLE_PYTORCH_ATTENTION", False))
    rec["xformers"] = bool(getattr(mm, "XFORMERS_IS_AVAILABLE", False))
    try:
        import comfy.ldm.modules.attention as attn

        rec["optimized_attention"] = getattr(attn.optimized_attention, "__name__", "?")
    except Exception as exc:  # noqa: BLE001
        rec["optimized_attention"] = repr(exc)
    rec["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    rec["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    rec["cuda_matmul_fp32_precision"] = getattr(torch.backends.cuda.matmul, "fp32_precision", "n/a")
    rec["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    rec["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    rec["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
    # third-party distributions actually imported (what the host path needs on this machine)
    dists: dict[str, str] = {}
    pkgs = md.packages_distributions()
    for top in sorted({m.split(".")[0] for m in list(sys.modules)}):
        if top == "av" and av_state.startswith("stub"):
            continue
        for d in pkgs.get(top, []):
            try:
                dists[d] = md.version(d)
            except md.PackageNotFoundError:  # pragma: no cover
                dists[d] = "?"
    rec["imported_distributions"] = dists
    try:
        import subprocess

        cmd = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        rec["git"] = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        rec["git"] = None


def ksampler(model, latent, pos, neg, *, seed, steps, cfg, sampler="ddim", scheduler="ddim_uniform"):
    """Stock ``KSampler`` node (nodes.py), under inference mode as ComfyUI's executor runs it."""
    import torch

    import nodes

    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent,
                                       denoise=1.0)[0]["samples"]


def tiny_on_device(tiny, layout: str, seed: int):
    """The host tier's tiny model (float32), loaded by ComfyUI onto the compute device."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mp = tiny.build(layout, seed=seed)
    return comfy.model_patcher.ModelPatcher(mp.model, mm.get_torch_device(), mm.unet_offload_device())


def section_parity_samplers(rec: dict, dm, tiny, steps: int, report: Report) -> None:
    import torch

    invert = dm("nodes.node_invert").InvertReference
    ama = dm("nodes.node_ama").AMAModelPatch
    guidance = dm("nodes.node_guidance").MatchingGuidanceSampler
    patch_of = dm("nodes.ama").patch_of
    for layout in ("sd15", "sdxl"):
        r: dict = {}
        rec[layout] = r
        model = tiny_on_device(tiny, layout, seed=1)
        with torch.inference_mode():
            ref = invert.execute(model, tiny.latent(3), tiny.cond(1), steps=steps)[0]
        pos, neg = tiny.cond(5), tiny.cond(6)
        # (a) AMA strength 0 vs stock KSampler on a noised latent, as test_ama does
        lat = tiny.latent(4)
        kw = dict(seed=3, steps=steps, cfg=5.0)
        vanilla = ksampler(model, lat, pos, neg, **kw)
        vanilla2 = ksampler(model, lat, pos, neg, **kw)
        p0 = ama.execute(model, ref, 0.0, 0.0, 1.0)[0]
        out0 = ksampler(p0, lat, pos, neg, **kw)
        p1 = ama.execute(model, ref, 1.0, 0.0, 1.0)[0]
        out1 = ksampler(p1, lat, pos, neg, **kw)
        stats0 = dict(patch_of(p0).last_stats or {})
        stats1 = dict(patch_of(p1).last_stats or {})
        r["vanilla_repeatable"] = compare(vanilla2, vanilla)
        r["ama_strength0_vs_vanilla"] = compare(out0, vanilla)
        r["ama_strength0_ref_passes"] = stats0.get("ref_passes")
        r["ama_strength1_changes_output"] = not bool(torch.equal(out1, vanilla))
        r["ama_strength1_ref_passes"] = stats1.get("ref_passes")
        r["vanilla"] = tensor_summary(vanilla)
        # (b) matching guidance at scale 0 vs stock KSampler ddim on an empty latent, as test_guidance does
        empty = {"samples": torch.zeros(1, 4, 16, 16)}
        gkw = dict(seed=3, steps=steps, cfg=5.0)
        van_g = ksampler(model, empty, pos, neg, **gkw)
        for mode in ("fast", "exact"):
            with torch.inference_mode():
                off, on = (guidance.execute(model, ref, 3, steps, 5.0, "ddim_uniform", pos, neg, empty, 1.0,
                                            scale, 0.08, 1.0, mode)[0]["samples"] for scale in (0.0, 50.0))
            r[f"mg_{mode}_scale0_vs_ksampler_ddim"] = compare(off, van_g)
            r[f"mg_{mode}_scale50_changes_output"] = not bool(torch.equal(on, van_g))
            r[f"mg_{mode}_scale50_finite"] = bool(torch.isfinite(on).all())
        ok = (r["ama_strength0_vs_vanilla"]["equal"] and r["mg_fast_scale0_vs_ksampler_ddim"]["equal"]
              and r["mg_exact_scale0_vs_ksampler_ddim"]["equal"])
        r["all_equal"] = ok
        report.log(f"  tiny {layout} fp32 on {model.load_device}: vanilla repeatable "
                   f"{r['vanilla_repeatable']['equal']}; AMA strength 0 == KSampler "
                   f"{r['ama_strength0_vs_vanilla']['equal']} (ref passes {r['ama_strength0_ref_passes']}); "
                   f"strength 1 changes output {r['ama_strength1_changes_output']}; "
                   f"MG scale 0 == KSampler ddim fast {r['mg_fast_scale0_vs_ksampler_ddim']['equal']} exact "
                   f"{r['mg_exact_scale0_vs_ksampler_ddim']['equal']}; scale 50 changes output "
                   f"{r['mg_fast_scale50_changes_output']}/{r['mg_exact_scale50_changes_output']}")
        del model, p0, p1
        free_memory()
    rec["all_equal"] = all(rec[k]["all_equal"] for k in ("sd15", "sdxl"))


def _descriptors(kind: str, b: int, c: int, ht: int, wt: int, hr: int, wr: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(b, c, ht, wt, generator=g), torch.randn(b, c, hr, wr, generator=g)
    if kind == "near-duplicate":  # the reference is a noisy, shifted copy: similarities near 1
        t = torch.randn(b, c, ht, wt, generator=g)
        r = torch.roll(t, shifts=(1, 2), dims=(2, 3))[:, :, :hr, :wr]
        return t, r + 1e-3 * torch.randn(r.shape, generator=g)
    if kind == "rank2":  # all descriptors in one 2-D subspace: best and second-best differ by ~1e-7
        a = torch.randn(c, 2, generator=g)
        zt, zr = torch.randn(b, 2, ht, wt, generator=g), torch.randn(b, 2, hr, wr, generator=g)
        return torch.einsum("ck,bkhw->bchw", a, zt), torch.einsum("ck,bkhw->bchw", a, zr)
    if kind == "ties":  # few distinct small-integer vectors: exact ties everywhere
        return (torch.randint(-1, 2, (b, c, ht, wt), generator=g).float(),
                torch.randint(-1, 2, (b, c, hr, wr), generator=g).float())
    raise ValueError(kind)


def section_parity_matching(rec: dict, dm, cases, report: Report) -> None:
    import torch

    mt = dm("dreammatcher_core.matching")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rec["device"] = str(dev)
    ieee = getattr(mt, "_ieee_fp32_matmul", None)  # private: which path argmax_flows takes
    rec["screened_path_on_device"] = ieee(dev) if ieee else "unknown"
    rec["screened_path_on_cpu"] = ieee(torch.device("cpu")) if ieee else "unknown"
    rows = []
    all_eq = True
    for kind, b, c, ht, wt, hr, wr in cases:
        ft32, fr32 = _descriptors(kind, b, c, ht, wt, hr, wr, seed=zlib.crc32(f"{kind}{c}{ht}{wt}".encode()))
        for dtype in (torch.float32, torch.float16):
            ft, fr = ft32.to(dtype), fr32.to(dtype)
            t2r_c, r2t_c = mt.argmax_flows(ft, fr)
            cyc_c = mt.cycle_error(t2r_c, r2t_c)
            for path in ("default", "exact-f64"):
                if path == "exact-f64" and dev.type != "cuda":
                    continue
                old = torch.backends.cuda.matmul.allow_tf32
                try:
                    if path == "exact-f64":  # TF32 allowed => not IEEE => the pack's exact float64 path
                        torch.backends.cuda.matmul.allow_tf32 = True
                    t2r_d, r2t_d = mt.argmax_flows(ft.to(dev), fr.to(dev))
                    cyc_d = mt.cycle_error(t2r_d, r2t_d)
                    sync()
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
                row = {"kind": kind, "dtype": str(dtype).replace("torch.", ""), "path": path,
                       "shape_t": [b, c, ht, wt], "shape_r": [b, c, hr, wr],
                       "flow_t2r_equal": bool(torch.equal(t2r_c, t2r_d.cpu())),
                       "flow_r2t_equal": bool(torch.equal(r2t_c, r2t_d.cpu())),
                       "cycle_error_equal": bool(torch.equal(cyc_c, cyc_d.cpu()))}
                if not row["flow_t2r_equal"]:
                    row["t2r_pixels_differing"] = int((t2r_c != t2r_d.cpu()).any(dim=1).sum())
                if not row["flow_r2t_equal"]:
                    row["r2t_pixels_differing"] = int((r2t_c != r2t_d.cpu()).any(dim=1).sum())
                eq = row["flow_t2r_equal"] and row["flow_r2t_equal"] and row["cycle_error_equal"]
                all_eq = all_eq and eq
                rows.append(row)
                report.log(f"  {kind:14s} {row['dtype']:8s} {path:9s} t{ht}x{wt} r{hr}x{wr} C{c} B{b}: "
                           f"flows cpu==device {row['flow_t2r_equal']}/{row['flow_r2t_equal']}, "
                           f"cycle_error {row['cycle_error_equal']}")
    rec["cases"] = rows
    rec["all_equal"] = all_eq


def section_matching_speed(rec: dict, dm, sizes, c: int, report: Report) -> None:
    """Wall time of argmax_flows (both directions) on the device: median of 5 after a warm-up."""
    import torch

    mt = dm("dreammatcher_core.matching")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for s in sizes:
        g = torch.Generator().manual_seed(s)
        ft = torch.randn(1, c, s, s, generator=g).to(dev)
        fr = torch.randn(1, c, s, s, generator=g).to(dev)
        mt.argmax_flows(ft, fr)
        sync()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            mt.argmax_flows(ft, fr)
            sync()
            times.append(time.perf_counter() - t)
        rec[f"{s}x{s}_ms"] = round(1000 * statistics.median(times), 3)
        report.log(f"  argmax_flows {s}x{s} C{c} on {dev}: {rec[f'{s}x{s}_ms']:.2f} ms")


def pick_dtype(bs, pack, width, layout, size, report: Report):
    """fp16 unless a 2-step probe gives non-finite latents with these random weights; then bf16."""
    import comfy.sample
    import torch

    cuda = torch.cuda.is_available()
    for dtype in ((torch.float16, torch.bfloat16) if cuda else (torch.float32,)):
        t = time.perf_counter()
        model = bs.build_model(width, 0, layout, dtype, build_on_device=cuda)
        sync()
        build_s = time.perf_counter() - t
        lat = size // 8
        x = torch.zeros(1, 4, lat, lat)
        pos, neg = bs.make_cond(2, layout, size), bs.make_cond(3, layout, size)
        with torch.inference_mode():
            out = comfy.sample.sample(model, comfy.sample.prepare_noise(x, 0), 2, 7.5, "ddim", "ddim_uniform",
                                      pos, neg, x, seed=0, disable_pbar=True)
        finite = bool(torch.isfinite(out).all())
        report.log(f"  built {layout} width {width} {dtype} in {build_s:.1f} s "
                   f"({sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M params); "
                   f"2-step probe finite: {finite}")
        if finite or dtype == torch.bfloat16:
            return model, dtype, build_s, finite
        del model
        free_memory()
    raise AssertionError("unreachable")


def section_bench(rec: dict, bs, pack: str, dm, *, layout: str, width: int, size: int, steps: int,
                  repeats: int, deadline: float, report: Report) -> None:
    import torch

    model, dtype, build_s, probe_finite = pick_dtype(bs, pack, width, layout, size, report)
    rec.update(layout=layout, width=width, size=size, steps=steps, repeats=repeats, dtype=str(dtype),
               params_m=round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1),
               build_s=round(build_s, 2), fp16_probe_finite=probe_finite)
    out = bs.measure(pack, width, size, steps, repeats, 1, layout=layout, model=model, warmup_all=True,
                     deadline=deadline, record_errors=True, log=report.log)
    res, ctx = out["results"], out["context"]
    van = res.get("vanilla", {})
    base_t, base_m = van.get("median_s"), van.get("peak_extra_bytes")
    table = {}
    for name, r in res.items():
        row = {k: v for k, v in r.items() if k not in ("out", "traceback")}
        if "median_s" in r:
            row["ms_per_step"] = round(1000 * r["median_s"] / steps, 2)
            own = res.get(r.get("baseline", "vanilla"), {}).get("median_s", base_t)  # ama-batch4: per image
            row["time_ratio"] = round(r["median_s"] / own, 3) if own else None
            row["peak_extra_mib"] = round(r["peak_extra_bytes"] / 2**20, 1)
            row["mem_ratio"] = round(r["peak_extra_bytes"] / base_m, 3) if base_m else None
            if r.get("out") is not None:
                row["out"] = tensor_summary(r["out"])
        if "traceback" in r:
            print(r["traceback"], flush=True)
        table[name] = row
    rec["methods"] = table
    if van.get("base_bytes") is not None:
        rec["base_alloc_mib"] = round(van["base_bytes"] / 2**20, 1)  # weights etc. before a run
        report.log(f"  allocation before a run (weights etc.): {rec['base_alloc_mib']:.0f} MiB")
    report.log("")
    head = f"{layout} {size}px {steps} steps {dtype}"
    report.log(f"| {head} | ms/step | x vanilla | peak extra MiB | x vanilla |")
    report.log("|---|---|---|---|---|")
    for name, row in table.items():
        if "ms_per_step" in row:
            report.log(f"| {name} | {row['ms_per_step']:.1f} | {row['time_ratio'] or 0:.2f} | "
                       f"{row['peak_extra_mib']:.0f} | {row['mem_ratio'] or 0:.2f} |")
        else:
            report.log(f"| {name} | {row.get('skipped') or row.get('error')} | | | |")
    peak = ("torch.cuda.max_memory_allocated above the allocation" if torch.cuda.is_available()
            else "sampled RSS above the RSS")
    report.log(f"(invert = inversion + reconstruction, 2 UNet passes per step; medians of up to "
               f"{repeats} runs after one warm-up each; peak = {peak} before each run)")
    report.save()

    # strength-0 / scale-0 parity on this (fp16, full-size) model, if time allows
    ref = ctx.get("reference")
    van_out = van.get("out")
    if ref is not None and van_out is not None and time.perf_counter() + 3 * (base_t or 0) < deadline:
        import comfy.sample

        pos, neg, tgt = ctx["positive"], ctx["negative"], ctx["target_latent"]
        x = tgt["samples"]
        p0 = dm("nodes.node_ama").AMAModelPatch.execute(model, ref, 0.0, 0.0, 1.0)[0]
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(x, 0)
            out0 = comfy.sample.sample(p0, noise, steps, 7.5, "ddim", "ddim_uniform", pos, neg, x, seed=0,
                                       disable_pbar=True)
            g0 = dm("nodes.node_guidance").MatchingGuidanceSampler.execute(
                model, ref, 0, steps, 7.5, "ddim_uniform", pos, neg, tgt, 1.0, 0.0, 0.08, 1.0, "fast")
            g0 = g0[0]["samples"]
        rec["parity_ama_strength0_vs_vanilla"] = compare(out0, van_out)
        rec["parity_mg_scale0_vs_vanilla"] = compare(g0, van_out)
        report.log(f"  {dtype} full-size parity: AMA strength 0 == vanilla "
                   f"{rec['parity_ama_strength0_vs_vanilla']}; MG scale 0 == vanilla "
                   f"{rec['parity_mg_scale0_vs_vanilla']}")
    else:
        rec["parity"] = "skipped (time budget or no reference)"
    del model, ctx, out
    free_memory()


def section_syncs(rec: dict, bs, pack: str, *, size: int, steps: int, report: Report) -> None:
    """Synchronisations per step (SD1.5 layout): the ones CUDA reports and the host-read proxy that
    ``make syncs`` measures on a CPU (``benchmarks/host_reads.py``), per method."""
    import host_reads

    model, dtype, _, _ = pick_dtype(bs, pack, 320, "sd15", size, report)
    rows = host_reads.count_methods(pack, model, size=size, steps=steps, layout="sd15")
    rec["rows"] = rows
    rec["setup"] = {"layout": "sd15", "size": size, "steps": steps, "dtype": str(dtype)}
    for line in host_reads.table(rows):
        report.log("  " + line)
    del model
    free_memory()


def section_profile(rec: dict, bs, pack: str, dm, *, size: int, steps: int, report: Report,
                    out: Path) -> None:
    """Where the AMA / guidance overhead goes: torch.profiler tables of one run each (SD1.5, fp16),
    plus direct timings of the descriptor pieces on the shapes SD1.5 gives at ``size``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, dtype, _, _ = pick_dtype(bs, pack, 320, "sd15", size, report)
    got = bs.measure(pack, 320, size, steps, 1, 1, layout="sd15", model=model, warmup_all=True,
                     methods=("ama",), log=report.log)
    ctx = got["context"]
    patched, ref, pos, neg = ctx["patched"], ctx["reference"], ctx["positive"], ctx["negative"]
    x = ctx["target_latent"]["samples"]
    import comfy.sample

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def ama_run():
        noise = comfy.sample.prepare_noise(x, 0)
        comfy.sample.sample(patched, noise, steps, 7.5, "ddim", "ddim_uniform", pos, neg, x, seed=0,
                            disable_pbar=True)

    def mg_run():
        dm("nodes.node_guidance").MatchingGuidanceSampler.execute(
            patched, ref, 0, steps, 7.5, "ddim_uniform", pos, neg, ctx["target_latent"], 1.0, 50.0, 0.08,
            1.0, "fast", match=ctx["match"])

    for name, fn in (("ama", ama_run), ("mg-fast", mg_run)):
        with torch.inference_mode():
            fn()  # warm
            sync()
            with profile(activities=acts, record_shapes=False) as prof:
                fn()
                sync()
        ka = prof.key_averages()
        for sort in ("self_cuda_time_total", "self_cpu_time_total"):
            try:
                table = ka.table(sort_by=sort, row_limit=22, max_name_column_width=60)
            except Exception as exc:  # noqa: BLE001
                table = f"(no table sorted by {sort}: {exc})"
            report.log(f"--- profile {name} sorted by {sort}\n{table}")
            (out / f"profile_{name}_{sort.split('_')[1]}.txt").write_text(table)
    # direct timings of the descriptor's pieces (SD1.5 at size: block 5 -> C 1280 at size/16, block 8 ->
    # C 640 at size/8), cond + uncond rows = 2 descriptors per step
    feats = dm("dreammatcher_core.features")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    timings = {}
    for c, hw in ((1280, size // 16), (640, size // 8)):
        a = torch.randn(1, c, hw, hw, device=dev, dtype=torch.float16)
        b = torch.randn(1, c, hw, hw, device=dev, dtype=torch.float16)
        rows = torch.cat([a[0].reshape(c, -1).T, b[0].reshape(c, -1).T]).float()
        for label, fn in (
            (f"co_pca C{c} {hw}x{hw}", lambda a=a, b=b: feats.co_pca(a, b, 256)),
            (f"eigh C{c} fp32", lambda rows=rows: torch.linalg.eigh(rows.T @ rows)),
            (f"eigh C{c} fp64", lambda rows=rows: torch.linalg.eigh((rows.T @ rows).double())),
        ):
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(5):
                fn()
            sync()
            timings[label] = round((time.perf_counter() - t) / 5 * 1000, 2)
            report.log(f"  {label}: {timings[label]} ms")
    rec["timings_ms"] = timings


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", help="output folder ($OUT)")
    ap.add_argument("--budget", type=float, default=285.0, help="seconds for the whole script (from start)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, 1-2 steps: prove the code path")
    ap.add_argument("--cpu", action="store_true", help="force ComfyUI onto the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on --cpu, else default)")
    ap.add_argument("--sd15-steps", type=int, default=20)
    ap.add_argument("--sd15-size", type=int, default=512)
    ap.add_argument("--sdxl-steps", type=int, default=20)
    ap.add_argument("--sdxl-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sdxl-repeats", type=int, default=2)
    ap.add_argument("--sdxl-min-left", type=float, default=120.0, help="skip SDXL with less budget left (s)")
    ap.add_argument("--no-sdxl", action="store_true")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: parity,matching,sd15,syncs,sdxl")
    ap.add_argument("--tree-hash", action="store_true", help="print the pack's source hash and exit")
    ap.add_argument("--profile", action="store_true", help="profile one AMA and one mg-fast run (SD1.5)")
    a = ap.parse_args()
    if a.tree_hash:
        print(tree_hash())
        return 0
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    end = T0 + a.budget
    report = Report(Path(a.out))
    report.data["argv"] = sys.argv
    report.data["budget_s"] = a.budget
    report.data["pack_tree_sha1"] = tree_hash()
    report.log(f"gpu_check: pack sources sha1 {report.data['pack_tree_sha1']}, budget {a.budget:.0f} s")

    av_state = install_av_stub()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    import torch

    use_cpu = a.cpu or not torch.cuda.is_available()
    if a.threads or use_cpu:
        torch.set_num_threads(a.threads or 1)
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import put_comfy_first_on_path

    put_comfy_first_on_path()
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = use_cpu
    import bench_sampling as bs

    tmp = Path(tempfile.mkdtemp(prefix="dm-gpu-check-"))
    with report.section("boot") as rec:
        t = time.perf_counter()
        pack = bs.boot(tmp, extras=False)
        rec["pack_module"] = pack
        rec["boot_s"] = round(time.perf_counter() - t, 2)
        report.log(f"  ComfyUI booted and pack loaded in {rec['boot_s']:.1f} s (av: {av_state})")
    if report.data["sections"]["boot"]["status"] != "ok":
        return 2
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in the log
    dm = lambda sub: importlib.import_module(f"{pack}.{sub}")  # noqa: E731
    tiny = importlib.import_module("testing_pack.tiny_models")

    with report.section("env") as rec:
        section_env(rec, av_state, a.smoke)
        for k in ("python", "torch", "torch_cuda", "device_name", "capability", "total_memory_mib", "comfyui",
                  "av", "vram_state", "optimized_attention", "float32_matmul_precision",
                  "cuda_matmul_allow_tf32", "cuda_matmul_fp32_precision", "cudnn_allow_tf32"):
            report.log(f"  {k}: {rec.get(k)}")
        dists = ", ".join(f"{k} {v}" for k, v in rec["imported_distributions"].items())
        report.log(f"  imported distributions: {dists}")

    if "parity" not in skip:
        with report.section("parity_samplers") as rec:
            section_parity_samplers(rec, dm, tiny, 4 if a.smoke else 8, report)
            report.log(f"  => sampler parity all equal: {rec['all_equal']}")
    if "matching" not in skip:
        if a.smoke:
            cases = [("random", 1, 16, 8, 8, 6, 7), ("ties", 2, 8, 8, 8, 8, 8), ("rank2", 1, 16, 8, 8, 8, 8)]
        else:
            cases = [("random", 1, 512, 32, 32, 32, 32), ("random", 2, 512, 64, 64, 48, 40),
                     ("random", 1, 512, 128, 128, 128, 128), ("near-duplicate", 1, 512, 64, 64, 64, 64),
                     ("rank2", 1, 64, 64, 64, 64, 64), ("ties", 1, 8, 32, 32, 32, 32),
                     ("ties", 2, 16, 48, 40, 32, 32)]
        with report.section("parity_matching") as rec:
            section_parity_matching(rec, dm, cases, report)
            report.log(f"  => matching cpu==device all equal: {rec['all_equal']}")
        with report.section("matching_speed") as rec:
            sizes, chans = ((16,), 64) if a.smoke else ((32, 64, 128), 512)
            section_matching_speed(rec, dm, sizes, chans, report)

    if "sd15" not in skip:
        with report.section("bench_sd15") as rec:
            full = (320, a.sd15_size, a.sd15_steps, a.repeats)
            width, size, steps, reps = (32, 64, 2, 1) if a.smoke else full
            reserve = 15.0 if (a.no_sdxl or "sdxl" in skip) else a.sdxl_min_left
            section_bench(rec, bs, pack, dm, layout="sd15", width=width, size=size, steps=steps, repeats=reps,
                          deadline=end - reserve, report=report)
    left = end - time.perf_counter()
    if a.no_sdxl or "sdxl" in skip:
        report.data["sections"]["bench_sdxl"] = {"status": "skipped (flag)"}
    elif left < a.sdxl_min_left:
        report.data["sections"]["bench_sdxl"] = {"status": f"skipped (only {left:.0f} s of budget left)"}
        report.log(f"== bench_sdxl skipped: {left:.0f} s left < {a.sdxl_min_left:.0f} s")
    else:
        with report.section("bench_sdxl") as rec:
            full = (320, a.sdxl_size, a.sdxl_steps, a.sdxl_repeats)
            width, size, steps, reps = (64, 64, 2, 1) if a.smoke else full
            section_bench(rec, bs, pack, dm, layout="sdxl", width=width, size=size, steps=steps, repeats=reps,
                          deadline=end - 5, report=report)

    left = end - time.perf_counter()
    if "syncs" in skip:
        report.data["sections"]["syncs"] = {"status": "skipped (flag)"}
    elif left < 45 and not a.smoke:
        report.data["sections"]["syncs"] = {"status": f"skipped (only {left:.0f} s of budget left)"}
        report.log(f"== syncs skipped: {left:.0f} s left")
    else:
        with report.section("syncs") as rec:
            size, steps = (64, 2) if a.smoke else (a.sd15_size, 10)
            section_syncs(rec, bs, pack, size=size, steps=steps, report=report)

    if a.profile:
        with report.section("profile") as rec:
            size, steps = (64, 2) if a.smoke else (a.sd15_size, a.sd15_steps)
            section_profile(rec, bs, pack, dm, size=size, steps=steps, report=report, out=Path(a.out))
        free_memory()

    report.data["status"] = "done" if not report.data["errors"] else "done with errors"
    report.save()
    report.log(f"done in {elapsed():.1f} s; errors: {report.data['errors'] or 'none'}; "
               f"JSON: {Path(a.out) / 'gpu_check.json'}")
    return 0 if not report.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
