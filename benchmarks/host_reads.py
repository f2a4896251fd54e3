"""Host reads per sampling step (``make syncs``): the places where Python waits for a tensor's value.

On a GPU every such read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``torch.equal``,
``nonzero``, a boolean-mask index, ...) is a device-to-host synchronisation: the CPU stops queueing
kernels until the GPU has caught up, which is what makes many small syncs per step expensive. The same
calls exist, and are counted here, on the CPU, so the figure can be measured and kept down on a machine
without a GPU. A ``torch.overrides.TorchFunctionMode`` (a supported, scoped torch API: nothing is
patched) sees every such call at the Python level and attributes it to the first frame inside this
repository that made it (``host`` when ComfyUI itself made it, e.g. its sampler reading a sigma).

``make gpu-check`` additionally counts the syncs the CUDA runtime reports
(``torch.cuda.set_sync_debug_mode``), the ground truth this proxy stands in for. The proxy is a lower
bound: it does not see synchronisations inside torch's own kernels (e.g. the error check of a CUDA
eigen-solver) or blocking host-to-device copies, and it follows a tensor's residence only through torch
calls.

Output: ``benchmarks/out/host_reads.json`` and a markdown table: reads per step for each method, split
into the pack's and the host's, and the pack's call sites ordered by count.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

#: Tensor methods and torch functions whose result is a host value (or has a data-dependent shape), so a
#: GPU must finish the work queued before them.
HOST_READ_NAMES = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__len__",
    "equal", "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
})


def _name(func) -> str:
    return getattr(func, "__name__", "") or ""


def _device_arg(args, kwargs):
    """The device a call names (``.to(...)``, a factory's ``device=``), or None."""
    dev = kwargs.get("device")
    if dev is None:
        dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
    return dev


def _is_host_read(func, args, kwargs) -> bool:
    """Whether the call reads the value of its first tensor argument back to Python (see the list)."""
    name = _name(func)
    if name in HOST_READ_NAMES:
        return name != "__len__"  # a shape read, not a value read
    if name == "to":
        dev = _device_arg(args, kwargs)
        return isinstance(dev, str) and dev.split(":")[0] == "cpu"
    if name == "__getitem__" and len(args) > 1:
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
    if name == "where" and len(args) == 1 and not kwargs:
        return True
    if name == "repeat_interleave":
        return "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor)
    return False


#: Attribute that marks a tensor which, on a GPU run, would live in host memory (reading it is free).
_HOST = "_dm_host_resident"


def _on_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _result_on_host(func, args, kwargs, tensors: list) -> bool:
    """Where the result of a call would live on a GPU run, emulated on the CPU.

    ``.cpu()`` and ``.to("cpu")`` move to the host; ``.to(device)`` with a ``torch.device`` (taken from a
    tensor) moves to the compute device; factories without a device, or with ``"cpu"``, make host tensors;
    any other call gives a host tensor only when every tensor it reads is one (a tensor never seen, such
    as a model weight or ComfyUI's latent, counts as on the compute device).
    """
    name = _name(func)
    if name in ("cpu", "numpy", "tolist"):
        return True
    if name == "to":
        dev = _device_arg(args, kwargs)
        if isinstance(dev, str):
            return dev.split(":")[0] == "cpu"
        if isinstance(dev, torch.device):
            return False
    if not tensors:
        dev = kwargs.get("device")
        return dev is None or (isinstance(dev, str) and dev.split(":")[0] == "cpu")
    return all(_on_host(t) for t in tensors)


def _site(roots: tuple[str, ...], depth_limit: int = 40) -> str:
    """``relative/path.py:line function`` of the innermost frame under one of the pack's ``roots``
    (its ``nodes/`` and ``dreammatcher_core/`` folders), else ``host``."""
    frame = sys._getframe(2)
    for _ in range(depth_limit):
        if frame is None:
            break
        path = frame.f_code.co_filename
        for root in roots:
            if path.startswith(root):
                rel = f"{Path(root).name}/{path[len(root):]}"
                return f"{rel}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "host"


class HostReadCounter(TorchFunctionMode):
    """Counts host reads while active, by call site (see the module docstring)."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        super().__init__()
        self.roots = roots
        self.recording = True
        self.sites: collections.Counter[str] = collections.Counter()
        self._inside = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside:
            return func(*args, **kwargs)
        self._inside = True  # a host read that calls another (``tolist`` -> ``cpu``) counts once
        try:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if self.recording and tensors and not _on_host(tensors[0]) and _is_host_read(func, args, kwargs):
                self.sites[_site(self.roots)] += 1
            host = _result_on_host(func, args, kwargs, tensors)
            out = func(*args, **kwargs)
            if _name(func) in ("to", "cpu") and out is args[0] and _on_host(out) != host:
                # A move to where the tensor already is returns it unchanged on the CPU; on a GPU run the
                # move makes a copy on the other side, and the original stays where it was.
                out = out.clone()
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not any(t is i for i in tensors):
                    try:
                        setattr(t, _HOST, host)
                    except (AttributeError, RuntimeError):
                        pass
            return out
        finally:
            self._inside = False

    @property
    def pack(self) -> int:
        return sum(n for s, n in self.sites.items() if s != "host")

    @property
    def host(self) -> int:
        return self.sites.get("host", 0)


def pack_roots(pack: str) -> tuple[str, ...]:
    """The pack's code folders as the interpreter sees their files (a linked custom-node folder keeps
    the link's path in ``co_filename``), each ending in a separator."""
    import os

    base = Path(importlib.import_module(pack).__file__).parent
    return tuple(str(base / d) + os.sep for d in ("nodes", "dreammatcher_core"))


def _cuda_sync_counter():
    """A context manager counting the synchronisations CUDA reports (``set_sync_debug_mode``), or
    None without CUDA. Each synchronising call raises a warning, recorded and counted here."""
    import contextlib
    import warnings

    if not torch.cuda.is_available():
        return None

    class _Syncs(contextlib.AbstractContextManager):
        n = 0

        def __enter__(self):
            self._w = warnings.catch_warnings(record=True)
            self._log = self._w.__enter__()
            warnings.simplefilter("always")
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            return self

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode(self._mode)
            self.n = sum("synchroniz" in str(w.message).lower() for w in self._log)
            self._w.__exit__(*exc)
            return False

    return _Syncs()


def count_methods(pack: str, model, *, size: int, steps: int, layout: str = "narrow",
                  methods=("vanilla", "ama", "ama-bank", "mg-fast", "mg-exact")) -> list[dict]:
    """Host reads per step of each method on ``model`` (a ModelPatcher), one sampling each, after an
    untimed warm-up (which also fills the bank); with CUDA, also the synchronisations CUDA reports.

    "Per step" divides by the sampling steps actually taken: ``ddim_uniform`` makes 7 of a requested 6.
    """
    import bench_sampling as bs
    import comfy.samplers

    dm = lambda sub: importlib.import_module(f"{pack}.{sub}")  # noqa: E731
    sc = bs.Scenario(pack, layout, size)
    for cond in (sc.positive, sc.negative, sc.ref_positive):  # ComfyUI keeps CONDITIONING in host memory
        for t in tree_flatten(cond)[0]:
            if isinstance(t, torch.Tensor):
                setattr(t, _HOST, True)
    match = sc.match
    counter = HostReadCounter(pack_roots(pack))
    counter.recording = False  # inversion and warm-ups run under the mode so host tensors get marked
    rows = []
    n_steps = len(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform",
                                                  steps)) - 1
    with counter:
        with torch.inference_mode():
            invert = dm("nodes.node_invert").InvertReference
            ref = invert.execute(model, sc.ref_latent, sc.ref_positive, steps=steps)[0]
        ama = dm("nodes.ama")
        patched = ama.patch_model(model, ref, 1.0, 0.08, 1.0, match=match)
        banked = ama.patch_model(model, ref, 1.0, 0.08, 1.0, match=match, bank_mib=bs.BANK_MIB)

        def sample(m):
            with torch.inference_mode():
                sc.sample(m, steps)

        def mg(mode):
            with torch.inference_mode():
                sc.guided(patched, ref, steps, mode)

        runs = {"vanilla": lambda: sample(model), "ama": lambda: sample(patched),
                "ama-bank": lambda: sample(banked), "mg-fast": lambda: mg("fast"),
                "mg-exact": lambda: mg("exact")}
        sample(model)  # loads the model
        sample(banked)  # fills the bank
        for name in methods:
            if name.startswith("mg-"):
                runs[name]()  # warm-up
            counter.sites = collections.Counter()
            counter.recording = True
            cuda = _cuda_sync_counter()
            if cuda is None:
                runs[name]()
            else:
                with cuda:
                    runs[name]()
            counter.recording = False
            row = {"method": name, "sampling_steps": n_steps,
                   "pack_per_step": round(counter.pack / n_steps, 2),
                   "host_per_step": round(counter.host / n_steps, 2),
                   "pack_sites": dict(sorted(((s, n) for s, n in counter.sites.items() if s != "host"),
                                             key=lambda kv: -kv[1]))}
            if cuda is not None:
                row["cuda_syncs_per_step"] = round(cuda.n / n_steps, 2)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    cuda = any("cuda_syncs_per_step" in r for r in rows)
    head = "| method | pack reads per step | host (ComfyUI) reads per step |" + (
        " CUDA syncs per step |" if cuda else "")
    out = [head, "|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        line = f"| {r['method']} | {r['pack_per_step']:g} | {r['host_per_step']:g} |"
        out.append(line + (f" {r.get('cuda_syncs_per_step', '')} |" if cuda else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64, help="narrow SD1.5 base channels (counts do not "
                    "depend on it)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "host_reads.json")
    a = ap.parse_args()

    import bench_sampling as bs

    pack = bs.boot(Path(tempfile.mkdtemp(prefix="dm-syncs-")), extras=False)
    rows = count_methods(pack, bs.build_model(a.width), size=a.size, steps=a.steps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"setup": {"width": a.width, "size": a.size, "steps": a.steps,
                                           "layout": "narrow SD1.5", "torch": torch.__version__},
                                 "rows": rows}, indent=1))
    taken = rows[0]["sampling_steps"] if rows else a.steps
    print(f"host reads per sampling step (narrow SD1.5 width {a.width}, {a.size}², {a.steps} DDIM steps "
          f"requested, {taken} taken, cfg 7.5)")
    print("\n".join(table(rows)))
    for r in rows:
        if r["pack_sites"]:
            print(f"\n{r['method']}: pack call sites (total over {taken} steps)")
            for site, n in r["pack_sites"].items():
                print(f"  {n:6d}  {site}")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
