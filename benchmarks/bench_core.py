"""Benchmark of ``dreammatcher_core.matching.argmax_flows`` against a naive full-matrix implementation,
and of the descriptor PCA's two solvers.

Run: ``.venv/bin/python benchmarks/bench_core.py`` (``make bench-core``).  Prints a markdown table.

What is measured, and how
-------------------------
* **Work**: flows in both directions (``flow_t2r`` and ``flow_r2t``) for one target/reference pair of
  ``[1, 512, S, S]`` float32 features, S in 32, 64, 128.
* **naive**: what the official code does (docs/method.md, "Semantic matching"): L2-normalise, build the full
  ``S^2 x S^2`` float32 cosine matrix with one matmul, ``argmax`` along both axes.
* **chunked**: ``argmax_flows`` with its default (automatic) chunk size.
* **Time**: median wall time of several calls after a small warm-up call.  Both implementations are
  timed in the *same* process, alternating call by call, so a busy shared machine slows both alike.
  Three configurations: torch's defaults; ``OMP_WAIT_POLICY=PASSIVE``; one thread.  On an oversubscribed
  machine OpenMP's default spin-waiting makes every multi-threaded region wait for descheduled threads,
  which penalises the implementation with more (smaller) parallel regions, i.e. the chunked one; the
  other two rows compare the work itself.
* **Peak extra memory**: the resident-set high-water mark above the resident set just before the call,
  measured in a *fresh* process per (size, implementation) with one call after a tiny warm-up.  The
  kernel's high-water mark (``VmHWM``) is reset to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs`` right before the call, so it sees every byte torch, BLAS and the allocator
  touch during the call (torch's CPU allocator has no peak statistics and ``tracemalloc`` does not see
  tensor memory).  Where that reset is not permitted, ``ru_maxrss`` is used instead and the table says so.
  Inputs are allocated before the baseline is taken and are not counted.
* **agree**: pixels where the two implementations pick different matches.  The naive float32 matmul
  differs from the exact similarity only on near-ties (a few 1e-7 apart), so a handful is expected at
  large sizes; the chunked result is the exact one (see ``matching``'s module docstring).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = (32, 64, 128)
CHANNELS = 512
REPEATS = {32: 15, 64: 5, 128: 2}


def _features(size: int):
    import torch

    g = torch.Generator().manual_seed(size)
    tgt = torch.randn(1, CHANNELS, size, size, generator=g)
    ref = torch.randn(1, CHANNELS, size, size, generator=g)
    return tgt, ref


def naive_flows(feat_tgt, feat_ref):
    """The official recipe: full float32 cosine matrix, argmax both ways (module docstring)."""
    import torch.nn.functional as F

    from dreammatcher_core.matching import flows_from_indices

    c = feat_tgt.shape[1]
    t = F.normalize(feat_tgt[0].reshape(c, -1).T, dim=1)
    r = F.normalize(feat_ref[0].reshape(c, -1).T, dim=1)
    sim = t @ r.T
    idx_t2r, idx_r2t = sim.argmax(dim=1), sim.argmax(dim=0)
    del sim
    hw_t, hw_r = tuple(feat_tgt.shape[-2:]), tuple(feat_ref.shape[-2:])
    return flows_from_indices(idx_t2r[None], idx_r2t[None], hw_t, hw_r)


def chunked_flows(feat_tgt, feat_ref):
    from dreammatcher_core.matching import argmax_flows

    return argmax_flows(feat_tgt, feat_ref)


IMPLS = {"chunked": chunked_flows, "naive": naive_flows}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64
    except OSError:
        return False


def child_memory(size: int, impl: str, out_path: str) -> None:
    import torch

    tgt, ref = _features(size)
    small = torch.randn(1, CHANNELS, 4, 4)
    IMPLS[impl](small, small)  # load kernels and thread pools outside the measurement
    exact_peak = _reset_peak()
    before_rss = _status_kb("VmRSS")
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flows = IMPLS[impl](tgt, ref)
    if exact_peak:
        extra_kb = _status_kb("VmHWM") - before_rss
    else:
        extra_kb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(before_max, before_rss))
    torch.save({"t2r": flows[0].to(torch.int16), "r2t": flows[1].to(torch.int16)}, out_path)
    print(json.dumps({"extra_mb": extra_kb / 1024.0, "method": "VmHWM" if exact_peak else "ru_maxrss"}))


def child_time(size: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    tgt, ref = _features(size)
    small = torch.randn(1, CHANNELS, 8, 8)
    for fn in IMPLS.values():
        fn(small, small)  # warm-up (kernels, thread pools) without a full-size call
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for _ in range(REPEATS[size]):
        for name, fn in IMPLS.items():
            t0 = time.perf_counter()
            fn(tgt, ref)
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({name: statistics.median(ts) for name, ts in times.items()}))


def _run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: Timing configurations: (label, torch threads (0 = default), extra environment).
TIME_CONFIGS = (
    ("default", 0, {}),
    ("OMP_WAIT_POLICY=PASSIVE", 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 thread", 1, {}),
)


#: (channels, pixels of the reference + target pair) of SD1.5's descriptor layers at 512² (block 5:
#: 1280 channels at 32², block 8: 640 at 64²) and of the narrow layout ``make bench`` uses.
PCA_SHAPES = ((1280, 2 * 32 * 32), (640, 2 * 64 * 64), (320, 2 * 32 * 32))


def pca_rows(k: int = 256) -> list[str]:
    """``pca_basis`` with the exact and the low-rank solver on the descriptor's shapes, same process,
    median of 3 after a warm-up; the inputs are correlated (a random mixing of Gaussian pixels), so the
    spectrum is not flat."""
    import torch

    from dreammatcher_core import features

    g = torch.Generator().manual_seed(0)
    rows = []
    for c, n in PCA_SHAPES:
        x = torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g) * 0.1
        t = {}
        for solver in features.PCA_SOLVERS:
            features.pca_basis(x, k, solver=solver)
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                features.pca_basis(x, k, solver=solver)
                runs.append(time.perf_counter() - t0)
            t[solver] = statistics.median(runs)
        rows.append(f"| {c} | {n} | {t['exact'] * 1e3:.0f} ms | {t['lowrank'] * 1e3:.0f} ms "
                    f"| {t['exact'] / t['lowrank']:.2f}x |")
    return rows


def main() -> None:
    import torch

    from dreammatcher_core.matching import auto_chunk_size

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    nthr = torch.get_num_threads()
    print(
        f"argmax_flows, both directions, C={CHANNELS}, float32, CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__} ({nthr} threads by default), load average {load:.1f} at start"
    )
    methods: set[str] = set()
    mem_rows, time_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            mem, files = {}, {}
            for impl in IMPLS:
                files[impl] = os.path.join(tmp, f"{impl}_{size}.pt")
                res = _run_child(["--memory", str(size), impl, files[impl]])
                mem[impl] = res["extra_mb"]
                methods.add(res["method"])
            a, b = torch.load(files["chunked"]), torch.load(files["naive"])
            differ = int((a["t2r"] != b["t2r"]).any(1).sum()) + int((a["r2t"] != b["r2t"]).any(1).sum())
            rows = min(auto_chunk_size(size * size), size * size)
            mem_rows.append(
                f"| {size}x{size} | {rows} | {mem['chunked']:.1f} MB "
                f"| {mem['naive']:.1f} MB | {differ} of {2 * size * size} |"
            )
            for label, threads, env in TIME_CONFIGS:
                t = _run_child(["--time", str(size), str(threads)], env)
                time_rows.append(
                    f"| {size}x{size} | {label} | {t['chunked'] * 1e3:.0f} ms | {t['naive'] * 1e3:.0f} ms "
                    f"| {t['naive'] / t['chunked']:.2f}x |"
                )
    print()
    print("| size | threads / OpenMP | chunked (default chunk) | naive full matrix | speed-up |")
    print("|---|---|---|---|---|")
    print("\n".join(time_rows))
    print()
    print("| size | chunk rows | peak extra chunked | peak extra naive | pixels whose match differs |")
    print("|---|---|---|---|---|")
    print("\n".join(mem_rows))
    print()
    print("PCA basis (top 256 directions), exact vs low-rank solver, default threads:")
    print("| channels | pixels | exact | lowrank | speed-up |")
    print("|---|---|---|---|---|")
    print("\n".join(pca_rows()))
    print()
    print(
        "Time: median wall time, both implementations alternating in one process per configuration. "
        "Peak extra memory: resident-set high-water mark above the pre-call RSS, one fresh process per "
        f"cell ({'/'.join(sorted(methods))}). On an oversubscribed machine OpenMP's default spin-waiting "
        "penalises the implementation with more parallel regions; the PASSIVE and 1-thread rows compare "
        "the work itself."
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        child_memory(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--time":
        child_time(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
