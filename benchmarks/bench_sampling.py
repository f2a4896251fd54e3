"""What DreamMatcher costs on top of plain ComfyUI sampling (``make bench``).

Everything runs in one process against the *same* model, seed, latent and schedule, and each
method is reported as a ratio to plain ComfyUI sampling (``comfy.sample.sample``, DDIM) measured
in the same run:

* ``vanilla``      stock sampling, the baseline;
* ``ama``          the model patched by ``DM_AMAPatch`` (reference pass + matching + AMA);
* ``mg-fast``      ``DM_MatchingGuidanceSampler`` in fast mode on the AMA-patched model;
* ``mg-exact``     the same in exact mode (a UNet backward per guided step);
* ``invert``       one-off ``DM_InvertReference`` (inversion + reconstruction check).

Model: a random-weight UNet with the SD1.5 block layout at reduced width (``--width``, default
the "narrow" 320/1,1,1,1 variant the e2e tier uses), so the attention layers, resolutions and token
counts are SD1.5's. Memory is the sampled resident-set high-water mark above the RSS right before
each run (psutil, 2 ms period); on a GPU it is ``torch.cuda.max_memory_allocated`` above the
allocation before the run.
"""

from __future__ import annotations

import argparse
import asyncio
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


def boot(tmp: Path):
    from comfy_env import put_comfy_first_on_path

    put_comfy_first_on_path()
    import torch
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    import folder_paths

    for sub in ("input", "output", "temp", "custom_nodes"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_input_directory(str(tmp / "input"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    link = tmp / "custom_nodes" / "dreammatcher"
    link.symlink_to(REPO, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(link), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    return str(link).replace(".", "_x_")


def build_model(width: int, seed: int = 0):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, out_channels=4, model_channels=width,
        num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 1, 1, 1],
        transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
        use_temporal_resblock=False, use_temporal_attention=False,
    )
    mc = comfy.supported_models.SD15(cfg)
    dev = comfy.model_management.get_torch_device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    init_weights(model, seed)  # the host tier's seeded initialisation (comfy ops leave torch.empty)
    model.to(dtype)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, dev, offload)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()

    import tempfile

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    pack = boot(tmp)
    dm = lambda sub: importlib.import_module(f"{pack}.{sub}")  # noqa: E731
    import comfy.sample

    model = build_model(a.width)
    lat = a.size // 8
    gen = torch.Generator().manual_seed(1)
    ref_latent = {"samples": torch.randn(1, 4, lat, lat, generator=gen) * 0.8}
    tgt_latent = {"samples": torch.zeros(a.batch, 4, lat, lat)}

    def cond(seed):
        g = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 77, 768, generator=g), {}]]

    pos, neg, ref_pos = cond(2), cond(3), cond(4)
    config = dm("nodes.config")
    match = config.MatchConfig(subject="sks dog", subject_tokens=(4, 5))

    results: dict[str, tuple[float, float]] = {}

    def timed(name, fn):
        times, mem = [], 0.0
        for _ in range(a.repeats):
            with PeakMemory() as pm:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            mem = max(mem, pm.extra)
        results[name] = (statistics.median(times), mem)
        med = statistics.median(times)
        print(f"  {name:10s} {med:8.2f} s   peak extra {mem / 2**20:8.1f} MiB", flush=True)

    invert = dm("nodes.invert").DM_InvertReference
    holder = {}

    def do_invert():
        holder["ref"] = invert.execute(model, ref_latent, ref_pos, steps=a.steps, scheduler="ddim_uniform",
                                       cfg=1.0)[0]

    def plain_sample(m):
        x = tgt_latent["samples"]
        noise = comfy.sample.prepare_noise(x, 0)
        comfy.sample.sample(m, noise, a.steps, 7.5, "ddim", "ddim_uniform", pos, neg, x, seed=0,
                            disable_pbar=True)

    def do_vanilla():
        plain_sample(model)

    print(f"DreamMatcher sampling benchmark: SD1.5 layout width {a.width}, {a.size}x{a.size} px, "
          f"batch {a.batch}, {a.steps} DDIM steps, cfg 7.5, device {model.load_device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    timed("vanilla", do_vanilla)  # also warms up
    results.pop("vanilla")
    timed("vanilla", do_vanilla)
    timed("invert", do_invert)
    ref = holder["ref"]
    patched = dm("nodes.ama").patch_model(model, ref, 1.0, 0.08, 1.0, match=match)

    def do_ama():
        plain_sample(patched)

    timed("ama", do_ama)
    guidance = dm("nodes.guidance").MatchingGuidanceSampler

    for mode in ("fast", "exact"):
        def do_mg(mode=mode):
            guidance.execute(patched, ref, 0, a.steps, 7.5, "ddim_uniform", pos, neg, tgt_latent, 1.0, 50.0,
                             0.08, 1.0, mode, match=match)

        timed(f"mg-{mode}", do_mg)

    base_t, base_m = results["vanilla"]
    print()
    print("| method | time (s) | × vanilla | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    for name, (t, m) in results.items():
        print(f"| {name} | {t:.2f} | {t / base_t:.2f} | {m / 2**20:.0f} |")
    print(f"\n(vanilla peak extra memory {base_m / 2**20:.0f} MiB; ratios are wall time / vanilla wall time, "
          f"median of {a.repeats} runs)")


if __name__ == "__main__":
    main()
