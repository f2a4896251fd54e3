"""Draw the one picture each node doc shows (``web/docs/images/<NodeId>.png``), from real runs.

The frontend's node docs panel is narrow, so each picture is a single labelled strip (at most
:data:`MAX_WIDTH` pixels wide and :data:`MAX_BYTES` bytes, limits the core test checks). None of them
is an illustration: every image is what the pack's own nodes return when they run on the miniature
world's shipped model (``scripts/miniworld/weights/miniworld.safetensors``, 32x32 latents whose
"VAE" is a fixed colour map), in ComfyUI booted in this process on the CPU. The graph is the demo
workflow's (same reference, prompts, seed and settings as ``make demo``), so a reader can reproduce
any picture by running that workflow. Nothing is downloaded.

Run (about six minutes of CPU time on a shared two-core machine, most of it in the AMA and guided
samplings; it writes the 13 PNGs and prints their sizes):

    .venv/bin/python scripts/make_node_doc_images.py

The 32x32 images are enlarged nearest-neighbour, so what the model made is shown pixel for pixel.
"""

from __future__ import annotations

import importlib
import io
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "web" / "docs" / "images"
MAX_WIDTH = 480  #: the docs panel is a sidebar; wider pictures are only scaled down there
MAX_BYTES = 60_000  #: keeps the pack (and the page) light
BG, FG, MUTED = (30, 32, 44), (235, 235, 240), (170, 172, 190)
PAD = 8


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font (scalable from Pillow 10.1), so the pictures need no system font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ComfyUI IMAGE ``[B, H, W, 3]`` (first item), a MASK ``[B, H, W]`` or ``[H, W, 3]`` as RGB."""
    t = image.detach().float().cpu()
    if t.ndim == 4:
        t = t[0]
    if t.ndim == 3 and t.shape[-1] not in (1, 3):  # a MASK batch [B, H, W]
        t = t[0]
    if t.ndim == 2:
        t = t[..., None].expand(*t.shape, 3)
    arr = (t[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def strip(panels: list[tuple[Image.Image, str]], title: str = "") -> Image.Image:
    """Panels side by side, each enlarged nearest-neighbour to the same side, captioned underneath.

    Captions stay in ASCII: the bundled font has no Greek letters (sigma, lambda would show as boxes).
    """
    n = len(panels)
    side = (MAX_WIDTH - PAD * (n + 1)) // n
    side = min(side, 160)
    f_cap, f_title = _font(13), _font(15)
    top = PAD + (22 if title else 0)
    width = PAD + n * (side + PAD)
    height = top + side + 24
    out = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((PAD, PAD), title, fill=FG, font=f_title)
    for i, (img, caption) in enumerate(panels):
        x = PAD + i * (side + PAD)
        resample = Image.Resampling.NEAREST if img.width < side else Image.Resampling.LANCZOS
        out.paste(img.convert("RGB").resize((side, side), resample), (x, top))
        w = draw.textlength(caption, font=f_cap)
        draw.text((x + max(0, (side - w) / 2), top + side + 5), caption, fill=MUTED, font=f_cap)
    return out


def fit(img: Image.Image) -> Image.Image:
    """``img`` scaled down to :data:`MAX_WIDTH` if wider."""
    if img.width <= MAX_WIDTH:
        return img
    h = round(img.height * MAX_WIDTH / img.width)
    return img.resize((MAX_WIDTH, h), Image.Resampling.LANCZOS)


def png_bytes(img: Image.Image) -> bytes:
    """Optimised PNG; falls back to a 128-colour palette if the full-colour file is over the limit."""
    for candidate in (img, img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)):
        buf = io.BytesIO()
        candidate.save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_BYTES:
            return buf.getvalue()
    raise ValueError(f"{img.size} picture stays over {MAX_BYTES} bytes even with 128 colours")


class MiniWorldRun:
    """The demo workflow's nodes, called in this process on the shipped miniature-world model."""

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        sys.path.insert(0, str(REPO / "scripts"))
        from comfy_env import boot_in_process

        self.base = Path(tempfile.mkdtemp(prefix="dm-doc-images-"))
        _, self.dirs, pack = boot_in_process(self.base, cpu=True, extras=False)
        self.mod = lambda name: importlib.import_module(f"{pack}.nodes.{name}")
        from miniworld import demo_graph, demo_nodes, world

        self.g, self.world = demo_graph, world
        self.model, self.clip = demo_nodes.load(demo_graph.WEIGHTS)
        self.ref_image, self.ref_latent, _ = demo_nodes.RenderSubject().run(**demo_graph.REF)

    def enc(self, text: str) -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def view(self, latent: dict) -> Image.Image:
        """A LATENT through the world's fixed "VAE" (its colour map), as MW_LatentToImage shows it."""
        rgb = self.world.latent_to_rgb(latent["samples"].float().cpu())
        return to_pil(rgb.permute(0, 2, 3, 1))

    def ksampler(self, model, seed: int) -> dict:
        import nodes as comfy_nodes

        g = self.g
        empty = {"samples": torch.zeros(1, 4, self.world.SIZE, self.world.SIZE)}
        return comfy_nodes.common_ksampler(model, seed, g.STEPS, g.CFG, "ddim", "ddim_uniform", self.pos,
                                           self.neg, empty, denoise=1.0)[0]

    def run(self) -> dict[str, Image.Image]:
        g = self.g
        invert, settings = self.mod("node_invert"), self.mod("node_settings")
        ama, diag, guidance = self.mod("node_ama"), self.mod("node_diagnostics"), self.mod("node_guidance")
        inspect = self.mod("node_inspect")
        self.pos, self.neg = self.enc(g.TARGET_PROMPT), self.enc("")
        pics: dict[str, Image.Image] = {}
        ref_view = to_pil(self.ref_image)

        # 1 Reference: inversion, its reconstruction, the file round trip
        out = invert.InvertReference.execute(self.model, self.ref_latent, self.enc(g.REF_PROMPT),
                                             steps=g.STEPS, scheduler="ddim_uniform", cfg=1.0,
                                             inversion_conditioning=self.neg)
        reference, noise, recon = out.args
        error = float(reference.trajectory.meta["recon_error"])
        pics["DM_InvertReference"] = strip(
            [(ref_view, "reference"), (self.view(noise), "inverted x_T"),
             (self.view(recon), f"rebuilt ({error:.1%} err.)")],
            f"DDIM inversion, {g.STEPS} steps ddim_uniform")
        invert.SaveReference.execute(reference, "dreammatcher/miniworld_doc")
        saved = sorted((self.dirs["output"] / "dreammatcher").glob("miniworld_doc_*.dm.safetensors"))[-1]
        loaded = invert.LoadReference.execute(f"output/dreammatcher/{saved.name}").args[0]
        pics["DM_SaveReference"] = self.trajectory_strip(reference,
                                                         "What the saved file holds: the latent per sigma")
        pics["DM_LoadReference"] = self.trajectory_strip(loaded, f"Loaded back: {saved.name}")

        # 2 Appearance matching and 3 Generate
        match = settings.MatchSettings.execute(lambda_c=0.4, mask_mode="soft", subject=g.SUBJECT,
                                               clip=self.clip, target_prompt=g.TARGET_PROMPT).args[0]
        patched = ama.AMAModelPatch.execute(self.model, reference, match=match).args[0]
        baseline = self.ksampler(self.model, g.SEED)
        with_ama = self.ksampler(patched, g.SEED)
        report = diag.AMADiagnostics.execute(patched, with_ama).args
        pics["DM_AMAPatch"] = strip(
            [(ref_view, "reference"), (self.view(baseline), "KSampler"),
             (self.view(with_ama), "KSampler + AMA")],
            f"'{g.TARGET_PROMPT}', seed {g.SEED}, same noise")
        pics["DM_AMADiagnostics"] = to_pil(report[2])
        guided = guidance.MatchingGuidanceSampler.execute(
            patched, reference, g.SEED, g.STEPS, g.CFG, "ddim_uniform", self.pos, self.neg,
            {"samples": torch.zeros(1, 4, self.world.SIZE, self.world.SIZE)}, 1.0, 50.0, 0.08, 1.0, "fast",
            match=match).args[0]
        full = strip([(ref_view, "reference"), (self.view(baseline), "baseline"),
                      (self.view(guided), "AMA + guidance")], "Full method: guidance fast, scale 50")
        pics["DM_MatchingGuidanceSampler"] = full
        pics["DM_MatchingGuidance"] = full

        # Inspectors: the reference against the AMA result
        target_view = self.view(with_ama)
        target_image = self.world.latent_to_rgb(with_ama["samples"].float()).permute(0, 2, 3, 1)
        feats = inspect.InspectFeatures.execute(self.model, self.ref_latent, with_ama, noise_percent=0.25,
                                                seed=0).args
        features = strip([(ref_view, "reference"), (to_pil(feats[0]), "its features"),
                          (target_view, "AMA result"), (to_pil(feats[1]), "its features")],
                         "Decoder features, first 3 principal components")
        pics["DM_InspectFeatures"] = pics["DM_ExtractFeatures"] = pics["DM_FeatureSettings"] = features
        warped, conf, fg, flow, composite = inspect.InspectMatch.execute(
            self.model, match=match, reference=self.ref_latent, target=with_ama, conditioning=self.pos,
            reference_image=self.ref_image, target_image=target_image, noise_percent=0.25, seed=0).args
        pics["DM_InspectMatch"] = pics["DM_SemanticMatch"] = strip(
            [(target_view, "target"), (to_pil(warped), "warped ref."), (to_pil(conf), "confidence"),
             (to_pil(fg), "subject mask"), (to_pil(flow), "flow")],
            "Correspondence, reference -> AMA result")
        pics["DM_MatchSettings"] = strip(
            [(to_pil(conf), "confidence, lambda_c 0.4"), (to_pil(fg), f"mask '{g.SUBJECT}'"),
             (to_pil(conf * fg), "gate = both")],
            "What Match Settings decide, on the AMA result")
        return pics

    def trajectory_strip(self, reference, title: str) -> Image.Image:
        """Four of the recorded latents, from the clean reference (sigma 0) to the inverted noise."""
        traj = reference.trajectory
        last = traj.sigmas.shape[0] - 1
        picks = [last, (2 * last) // 3, last // 3, 0]
        return strip([(self.view({"samples": traj.latents[i][:1]}), f"sigma {float(traj.sigmas[i]):.2f}")
                      for i in picks], title)


def main() -> int:
    pics = MiniWorldRun().run()
    OUT.mkdir(parents=True, exist_ok=True)
    for node_id, img in sorted(pics.items()):
        data = png_bytes(fit(img))
        (OUT / f"{node_id}.png").write_bytes(data)
        print(f"{node_id}.png: {img.width}x{img.height}, {len(data)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
