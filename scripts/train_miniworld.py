"""Train the miniature world's model (``make train-miniworld``): seeded, resumable-free, CPU or CUDA.

WHY this recipe (docs/miniworld.md): the model must draw the prompted shape, position and appearance,
and must also be able to *take* an appearance through decoder self-attention, as Stable Diffusion does
and as DreamMatcher relies on. Most of every batch is therefore photographed in pairs: two scenes of
the same subject at different positions, whose decoder self-attention layers attend jointly over both
images (each image's keys and values extended by its partner's), while the first image's prompt often
leaves the appearance out. Convolutions never see across the pair, so the only way the pair can agree
is self-attention. The rest of the batch is single scenes, with the appearance words dropped for part
of it and every word dropped for another part (the unconditional context for CFG).

Writes ``--out`` (fp16 safetensors: ``unet.*`` EMA weights and ``text.*``) every ``--save-every``
steps and at the end, and a CSV loss log next to it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
WEIGHTS = REPO / "scripts" / "miniworld" / "weights"


def main() -> int:
    from miniworld import world  # pure torch: the vocabulary and palettes, before ComfyUI is on the path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=WEIGHTS / "miniworld-trained.safetensors",
        help="where to save; the default sits beside the shipped model without replacing it, so the "
        "benchmark and evaluation scripts can read it with --weights miniworld-trained.safetensors",
    )
    # the defaults are the shipped model's recipe (scripts/miniworld/weights/MODEL_CARD.md)
    ap.add_argument("--steps", type=int, default=1850)
    ap.add_argument("--minutes", type=float, default=75.0, help="stop (and save) after this wall time")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=12, help="joint pairs per batch (2 images each)")
    ap.add_argument(
        "--read-only-pairs",
        type=int,
        default=0,
        help="read-only pairs per batch (2 images each): the first image reads decoder self-attention "
        "keys and values from its partner only, as in key/value replacement",
    )
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="bf16: autocast the forward pass to bfloat16 (fp32 weights, optimiser and loss); about 1.5x "
        "faster on CPUs with bf16 matrix units and on CUDA. fp32: the recipe of the first shipped model",
    )
    ap.add_argument(
        "--palette",
        choices=sorted(world.PALETTES),
        default=world.SHIPPED_PALETTE,
        help="the RGB values of the colour words (docs/miniworld.md); recorded in the weights, which "
        "the benchmark and evaluation scripts read",
    )
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    from comfy_env import put_comfy_first_on_path

    put_comfy_first_on_path()
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not cuda
    from miniworld import model as mw_model
    from miniworld import training

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    base = mw_model.build_base_model(device)
    unet = base.diffusion_model
    mw_model.init_unet(unet, args.seed)
    unet.to(device).train()
    text = mw_model.WordEncoder().to(device)
    ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ac = (1.0 / (1.0 + base.model_sampling.sigmas.double() ** 2)).float().to(device)  # alphas_cumprod

    gen = torch.Generator().manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log.csv")
    log = open(log_path, "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "seconds", "loss", "loss_pairs", "lr"])
    from tqdm import tqdm

    start = time.time()
    bar = tqdm(range(args.steps), desc="train miniworld", dynamic_ncols=True, mininterval=5)
    step = 0
    for step in bar:
        lr = (
            args.lr
            * min(1.0, (step + 1) / 100)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = training.sample_batch(gen, args.batch, args.pairs, args.read_only_pairs, args.palette)
        x0 = batch.latents.to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        t[batch.partner >= 0] = t[batch.partner[batch.partner >= 0]]  # pair partners share the noise level
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = ac[t.to(device)].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        opts = training.pair_attention_options(batch.sources.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            ctx = text(batch.ids.to(device))
            pred = unet(xt, t.to(device).float(), context=ctx, transformer_options=opts)
        snr = a / (1 - a)
        w = (torch.clamp(snr, max=5.0) / snr).view(-1)
        per = F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * w
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        paired = batch.partner >= 0
        writer.writerow(
            [
                step,
                round(time.time() - start, 1),
                round(loss.item(), 5),
                round(per[paired.to(device)].mean().item(), 5),
                f"{lr:.2e}",
            ]
        )
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0:
            log.flush()
            training.save(args.out, ema, text, step + 1, time.time() - start, args)
        if time.time() - start > args.minutes * 60:
            print(f"time budget of {args.minutes} min reached at step {step + 1}", flush=True)
            break
    training.save(args.out, ema, text, step + 1, time.time() - start, args)
    log.close()
    print(f"saved {args.out} after {step + 1} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
