"""Measure generated images of the miniature world: where the subject is, its shape, texture and colours.

WHY: the pack's claim (the subject takes the reference's appearance while the prompt keeps the layout)
has to be scored on images a small model generated. Those images are imperfect (blurred edges, noisy
colours, patterns that are only roughly right), so every measurement here is a robust statistic of the
image, calibrated on clean and degraded renders of :mod:`miniworld.world` (see
``tests/core/test_miniworld_measure.py`` for the known-answer accuracies). Pure torch + numpy, so it runs
anywhere the world itself runs, without ComfyUI.

Conventions: images are ``[3, H, W]`` RGB in ``[0, 1]``; masks are ``[H, W]`` bool; coordinates are the
world's continuous pixel coordinates (pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``), so a
centroid can be compared directly with :data:`world.ANCHORS`.
"""

from __future__ import annotations

import math
from collections import deque
from functools import cache, lru_cache

import numpy as np
import torch

from . import world


@cache
def palette_tensor(palette: str = world.DEFAULT_PALETTE) -> torch.Tensor:
    """A named palette as a [8, 3] tensor in :data:`world.COLOUR_NAMES` order (the label ids).

    Every colour reading takes the palette's name: the one the measured model was trained on.
    """
    colours = world.palette_colours(palette)
    return torch.tensor([colours[name] for name in world.COLOUR_NAMES], dtype=torch.float32)

FOREGROUND_DIST = 0.18  #: RGB distance from the background beyond which a pixel is foreground
MIN_AREA = 4  #: a foreground component smaller than this is a speck of noise, not a subject
MIN_CORE = 12  #: the eroded mask must keep this many pixels to be used instead of the full mask
MIN_SHARE = 0.15  #: default share of the subject a palette colour needs to be one of its colours
SOLID_SHARE = 0.85  #: one palette colour covering this share of the subject makes it solid
FIT_CAP = 0.15  #: residual cap of the robust colour fit (pixels farther than this are outliers)
EXPLAINED = 0.12  #: a pixel within this RGB distance of the fitted colour model counts as explained
MIX_COST = 0.03**2  #: squared-distance price of explaining a pixel as a mix rather than a pure colour
PRUNE = 0.10  #: a fitted colour with a smaller share is noise absorbed by the fit and is dropped
#: Area of each shape per unit radius squared (world.shape_mask geometry), to fit the radius from the area.
_AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.86) ** 2,
                "triangle": 1.75 * (1.75 * math.tan(math.radians(33)))}
#: The triangle's area centroid lies r/6 below its template centre (apex cy - r, base cy + 0.75 r).
_TRIANGLE_DROP = 1.0 / 6.0


# --- the subject's mask -------------------------------------------------------------------------------

def background_colour(rgb: torch.Tensor) -> torch.Tensor:
    """The median colour of the border pixels, [3].

    WHY the border: the world's subject never fills the frame, so the border is (almost all) background,
    and the median ignores the few subject pixels that touch it and the noise of a generated image.
    """
    border = torch.cat([rgb[:, 0, :], rgb[:, -1, :], rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]], dim=1)
    return border.median(dim=1).values


def noise_level(rgb: torch.Tensor) -> float:
    """Robust per-channel noise standard deviation of the border (background) pixels.

    WHY: generated images carry colour noise of unknown strength; measuring it on the plain background
    lets the colour fit widen its tolerances only as much as the image needs (0 for clean renders).
    """
    border = torch.cat([rgb[:, 0, :], rgb[:, -1, :], rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]], dim=1).float()
    mad = (border - border.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    return float(1.4826 * mad.mean())


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 4-connected component of a bool mask (ties: the first found in raster order).

    WHY a plain flood fill: images are 32x32, so a Python BFS is fast enough and needs no dependency.
    """
    m = mask.detach().cpu().numpy().astype(bool)
    h, w = m.shape
    seen = np.zeros_like(m)
    best: list[tuple[int, int]] = []
    for i0, j0 in zip(*np.nonzero(m), strict=True):
        if seen[i0, j0]:
            continue
        seen[i0, j0] = True
        comp = [(int(i0), int(j0))]
        queue = deque(comp)
        while queue:
            i, j = queue.popleft()
            for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= a < h and 0 <= b < w and m[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    comp.append((a, b))
                    queue.append((a, b))
        if len(comp) > len(best):
            best = comp
    out = torch.zeros(h, w, dtype=torch.bool)
    if best:
        idx = torch.tensor(best)
        out[idx[:, 0], idx[:, 1]] = True
    return out.to(mask.device)


def subject_mask(rgb: torch.Tensor, threshold: float = FOREGROUND_DIST,
                 min_area: int = MIN_AREA) -> torch.Tensor:
    """Foreground [H, W] bool: pixels far from the background colour, largest 4-connected component.

    WHY a colour distance: every palette colour is far (> 0.8) from the light background, so 0.18 keeps
    the subject's body and drops faint antialiased edges and the noise of generated backgrounds; the
    largest component drops stray specks, and a largest component under ``min_area`` pixels (noise on a
    blank image) leaves the mask empty. May be empty.
    """
    bg = background_colour(rgb.float())
    dist = (rgb.float() - bg.view(3, 1, 1)).norm(dim=0)
    mask = largest_component(dist > threshold)
    return mask if int(mask.sum()) >= min_area else torch.zeros_like(mask)


def erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of the mask whose four neighbours are all in the mask (outside the image counts as out)."""
    m = torch.nn.functional.pad(mask.bool(), (1, 1, 1, 1), value=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def core_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask without its 1-pixel boundary ring, unless that leaves fewer than ``MIN_CORE`` pixels.

    WHY: antialiased (or blurred) edge pixels mix the subject's colour with the background and would be
    read as a wrong palette colour.
    """
    eroded = erode(mask)
    return eroded if int(eroded.sum()) >= MIN_CORE else mask.bool()


# --- colours ------------------------------------------------------------------------------------------

def palette_distances(rgb: torch.Tensor, palette: str = world.DEFAULT_PALETTE) -> torch.Tensor:
    """Euclidean RGB distance of every pixel to every palette colour, [8, H, W]."""
    return (rgb.float().unsqueeze(0) - palette_tensor(palette).to(rgb.device).view(-1, 3, 1, 1)).norm(dim=1)


def palette_labels(
    rgb: torch.Tensor, mask: torch.Tensor, palette: str = world.DEFAULT_PALETTE
) -> torch.Tensor:
    """Nearest palette colour id per pixel (:data:`world.COLOUR_NAMES` order), -1 outside the mask."""
    labels = palette_distances(rgb, palette).argmin(dim=0)
    return torch.where(mask.bool(), labels, torch.full_like(labels, -1))


_PAIRS = [(a, b) for a in range(len(world.COLOURS)) for b in range(a + 1, len(world.COLOURS))]


def _closest_on_triangles(p: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor,
                          v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Closest points of pixels p [n, 3] on triangles (v0, v1, v2), each [k, 3].

    Returns (distance, w1, w2, s, u), each [k, n]: the distance and the barycentric weights of v1 and v2
    of the closest point (v0's weight is 1 - w1 - w2), and the unclamped weights s, u of the orthogonal
    projection on the triangle's plane. The closest point is either that projection (when it falls
    inside) or the closest point of one of the three edges.
    """
    e1, e2 = (v1 - v0)[:, None], (v2 - v0)[:, None]  # [k, 1, 3]
    q = p[None] - v0[:, None]  # [k, n, 3]
    a11, a12, a22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)  # [k, 1]
    b1, b2 = (q * e1).sum(-1), (q * e2).sum(-1)  # [k, n]
    det = (a11 * a22 - a12 * a12).clamp_min(1e-9)
    s_in, u_in = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    s_01 = (b1 / a11).clamp(0, 1)
    u_02 = (b2 / a22).clamp(0, 1)
    e12 = e2 - e1
    v_12 = (((q - e1) * e12).sum(-1) / (e12 * e12).sum(-1).clamp_min(1e-9)).clamp(0, 1)
    cands_s = torch.stack([s_in, s_01, torch.zeros_like(u_02), 1 - v_12])
    cands_u = torch.stack([u_in, torch.zeros_like(s_01), u_02, v_12])
    point = cands_s[..., None] * e1 + cands_u[..., None] * e2  # [4, k, n, 3]
    dist = (q[None] - point).norm(dim=-1)
    inside = (s_in >= 0) & (u_in >= 0) & (s_in + u_in <= 1)
    dist[0] = torch.where(inside, dist[0], torch.full_like(dist[0], math.inf))
    best = dist.argmin(dim=0, keepdim=True)
    return (dist.gather(0, best)[0], cands_s.gather(0, best)[0], cands_u.gather(0, best)[0], s_in, u_in)


def colour_fit(rgb: torch.Tensor, mask: torch.Tensor, palette: str = world.DEFAULT_PALETTE) -> dict:
    """Unmix the subject's core pixels into palette colours.

    WHY a mixture model rather than nearest-colour votes: a pattern's edges, antialiasing and blur give
    pixels between the subject's two colours (and, near the outline, the background), and such mixes
    often sit next to a *third* palette colour (red + yellow reads orange; a blurred 2-px stripe has no
    pure pixel at all). So every pair of palette colours (a, b) is tried as a triangle (a, b, background)
    in RGB, the pair with the least robust (capped) squared distance to the pixels wins, and each pixel
    gives its colour mass to a and b by its (unclamped, hence unbiased under noise) barycentric weights
    on the triangle's plane. Distance thresholds grow with the noise level measured on the background
    (:func:`noise_level`), so that noisy but correct pixels stay explained. Pixels the pair leaves
    unexplained but that are close to another palette colour vote for that colour, so a partially wrong
    subject still shows its extra colour. A fitted colour under ``PRUNE`` of the mass is the fit absorbing
    noise (a solid subject still picks a pair) and hands its mass to its partner.

    Returns {"shares": [8] soft shares (zeros if empty), "pair": (a, b) or None, "ink": [H, W] position
    of every pixel between b (0) and a (1), "core": the core mask}.
    """
    core = core_mask(mask).cpu()
    img = rgb.detach().float().cpu()
    n_col = len(world.COLOURS)
    out = {"shares": torch.zeros(n_col), "pair": None, "ink": torch.zeros(img.shape[1:]), "core": core}
    if int(core.sum()) == 0:
        return out
    pix = img[:, core].T  # [n, 3]
    bg = background_colour(img)
    table = palette_tensor(palette)
    pa = table[[a for a, _ in _PAIRS]]
    pb = table[[b for _, b in _PAIRS]]
    sigma = noise_level(img)
    cap, explained = max(FIT_CAP, 4.0 * sigma), max(EXPLAINED, 3.5 * sigma)
    dist, wa, wb, sa, sb = _closest_on_triangles(pix, bg.expand_as(pa), pa, pb)
    # World pixels are mostly pure colours: a pixel explained as a mix pays MIX_COST (plus the 2 sigma^2
    # by which noise favours a plane over a point), so a solid orange is not read as a red-yellow blend.
    to_a = (pix[None] - pa[:, None]).square().sum(-1)
    to_b = (pix[None] - pb[:, None]).square().sum(-1)
    mixed = dist.square() + MIX_COST + 2.0 * sigma**2
    cost = torch.minimum(torch.minimum(to_a, to_b), mixed).clamp_max(cap**2).sum(dim=1)
    k = int(cost.argmin())
    a, b = _PAIRS[k]
    d, wa, wb, sa, sb = dist[k], wa[k], wb[k], sa[k], sb[k]
    t = wa / (wa + wb).clamp_min(1e-6)
    mass = torch.zeros(n_col)
    keep = (d < explained) & (wa + wb >= 0.3)
    mass[a] += float(sa[keep].sum().clamp_min(0))
    mass[b] += float(sb[keep].sum().clamp_min(0))
    near = palette_distances(pix.T.unsqueeze(-1), palette)[:, :, 0]  # [8, n]
    nearest_d, nearest = near.min(dim=0)
    other = (d >= explained) & (nearest_d < explained)
    mass += torch.bincount(nearest[other], minlength=n_col).float()
    if float(mass.sum()) == 0:
        return out
    for weak, strong in ((a, b), (b, a)):
        if mass[weak] < PRUNE * mass.sum():
            mass[strong] += mass[weak]
            mass[weak] = 0.0
    ink = torch.zeros(img.shape[1:])
    ink[core] = t
    out.update(shares=mass / mass.sum(), pair=(a, b), ink=ink)
    return out


def colour_shares(
    rgb: torch.Tensor, mask: torch.Tensor, palette: str = world.DEFAULT_PALETTE
) -> torch.Tensor:
    """Soft share [8] of each palette colour in the subject (see :func:`colour_fit`); zeros if empty."""
    return colour_fit(rgb, mask, palette)["shares"]


def colour_set(rgb: torch.Tensor, mask: torch.Tensor, min_share: float = MIN_SHARE,
               palette: str = world.DEFAULT_PALETTE) -> frozenset[str]:
    """Palette colours covering at least ``min_share`` of the subject (its core, by :func:`colour_shares`).

    ``min_share`` below ``PRUNE`` cannot bring back a fitted colour the fit pruned as noise.
    """
    return _names_over(colour_shares(rgb, mask, palette), min_share)


def _names_over(shares: torch.Tensor, min_share: float) -> frozenset[str]:
    """Names of the palette colours whose share reaches ``min_share``."""
    return frozenset(name for i, name in enumerate(world.COLOUR_NAMES) if float(shares[i]) >= min_share)


def colour_hist(rgb: torch.Tensor, mask: torch.Tensor, palette: str = world.DEFAULT_PALETTE) -> torch.Tensor:
    """Normalised histogram [8] of the subject's palette colours (soft shares; all zeros if empty)."""
    return colour_shares(rgb, mask, palette)


def hist_dist(rgb_a: torch.Tensor, mask_a: torch.Tensor, rgb_b: torch.Tensor, mask_b: torch.Tensor,
              palette: str = world.DEFAULT_PALETTE) -> float:
    """1 - histogram intersection of the two subjects' palette histograms: 0 identical, 1 disjoint.

    WHY intersection: it is bounded, symmetric and reads as "the share of colour the two subjects have
    in common"; an empty subject shares nothing, so it is at distance 1 from everything.
    """
    ha, hb = colour_hist(rgb_a, mask_a, palette), colour_hist(rgb_b, mask_b, palette)
    if ha.sum() == 0 or hb.sum() == 0:
        return 1.0
    return float((1.0 - torch.minimum(ha, hb).sum()).clamp(0, 1))


# --- texture ------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _texture_templates() -> tuple[tuple[str, ...], torch.Tensor]:
    """World ink patterns at every phase of each pattern (0.5-px steps), [N, H, W], with their names.

    WHY every phase: a generated image's pattern need not be phase-locked to the subject's centre, so
    the best match over phases is used. Stripes have period 4 (in y only), dots period 4, and the
    checker's half-period shift (3 px) only swaps ink and base, which |correlation| ignores.
    """
    names: list[str] = []
    maps: list[torch.Tensor] = []
    c = world.SIZE / 2
    for texture, period_x, period_y in (("stripes", 0.5, 4.0), ("checker", 3.0, 3.0), ("dots", 4.0, 4.0)):
        for px in np.arange(0.0, period_x, 0.5):
            for py in np.arange(0.0, period_y, 0.5):
                names.append(texture)
                maps.append(world.texture_ink(texture, c + float(px), c + float(py)))
    return tuple(names), torch.stack(maps)


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of x [n] with each row of y [k, n] (0 where either is constant)."""
    x = x - x.mean()
    y = y - y.mean(dim=-1, keepdim=True)
    den = x.norm() * y.norm(dim=-1)
    return torch.where(den > 1e-8, (y @ x) / den.clamp_min(1e-8), torch.zeros_like(den))


def texture_scores(rgb: torch.Tensor, mask: torch.Tensor, fit: dict | None = None,
                   palette: str = world.DEFAULT_PALETTE) -> dict[str, float]:
    """Best |Pearson correlation| over phases between the subject's ink map and each world pattern.

    The ink map is every core pixel's position between the subject's two fitted colours
    (:func:`colour_fit`); WHY continuous: antialiased or blurred pattern edges then give intermediate
    values instead of wrong hard labels, which keeps the pattern's geometry for the correlation.
    """
    return {t: v for t, (v, _) in _texture_matches(rgb, mask, fit, palette).items()}


def _texture_matches(rgb: torch.Tensor, mask: torch.Tensor, fit: dict | None,
                     palette: str = world.DEFAULT_PALETTE) -> dict[str, tuple[float, torch.Tensor | None]]:
    """Per pattern: (best |correlation|, that template on the core pixels)."""
    fit = fit if fit is not None else colour_fit(rgb, mask, palette)
    core = fit["core"]
    if int(core.sum()) < 4 or fit["pair"] is None:
        return {t: (0.0, None) for t in world.TEXTURES[1:]}
    names, maps = _texture_templates()
    tmpl = maps[:, core]
    corr = _corr(fit["ink"][core], tmpl).abs()
    out: dict[str, tuple[float, torch.Tensor | None]] = {}
    for t in world.TEXTURES[1:]:
        idx = [i for i, n in enumerate(names) if n == t]
        i = idx[int(corr[idx].argmax())]
        out[t] = (float(corr[i]), tmpl[i])
    return out


def _partial_corr(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> float:
    """|Correlation| of x with t1 once t2 is regressed out of both (0 when degenerate)."""
    r = _corr(x, torch.stack([t1, t2])).tolist()
    r12 = float(_corr(t1, t2[None])[0])
    den = math.sqrt(max((1 - r[1] ** 2) * (1 - r12 ** 2), 0.0))
    return abs(r[0] - r[1] * r12) / den if den > 1e-6 else 0.0


def texture_class(rgb: torch.Tensor, mask: torch.Tensor, fit: dict | None = None,
                  palette: str = world.DEFAULT_PALETTE) -> str | None:
    """One of :data:`world.TEXTURES`, or None for an empty mask.

    'solid' when one palette colour holds at least ``SOLID_SHARE`` of the subject's colour mass;
    otherwise the world pattern (stripes, checker, dots) that best correlates with the ink map. WHY the
    partial correlation between the two best patterns: dots sit in rows 4 px apart, so a dots template
    also correlates well (~0.7) with stripes and vice versa; the pattern that still explains the ink map
    once the other one is regressed out is the one really there.
    """
    if not bool(mask.any()):
        return None
    fit = fit if fit is not None else colour_fit(rgb, mask, palette)
    if fit["pair"] is None or float(fit["shares"].max()) >= SOLID_SHARE:
        return "solid"  # one colour dominates, or no palette colour fits at all: no pattern to read
    matches = _texture_matches(rgb, mask, fit, palette)
    first, second = sorted(matches, key=lambda t: matches[t][0], reverse=True)[:2]
    t1, t2 = matches[first][1], matches[second][1]
    if t1 is None or t2 is None:
        return first
    x = fit["ink"][fit["core"]]
    return first if _partial_corr(x, t1, t2) >= _partial_corr(x, t2, t1) else second


# --- geometry -----------------------------------------------------------------------------------------

def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(x, y) mean of the mask's pixel centres in world coordinates; (nan, nan) for an empty mask."""
    idx = torch.nonzero(mask.bool()).float()
    if idx.numel() == 0:
        return (math.nan, math.nan)
    y, x = (idx.mean(dim=0) + 0.5).tolist()
    return (x, y)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two bool masks (soft masks are thresholded at 0.5); 0 if both empty."""
    a = a > 0.5 if a.is_floating_point() else a.bool()
    b = b > 0.5 if b.is_floating_point() else b.bool()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def fit_shape(mask: torch.Tensor, shape: str) -> tuple[float, float, float, float]:
    """Best (iou, cx, cy, r) of a world shape template against the mask.

    WHY this search: the radius follows from the area and the template centre from the centroid (the
    triangle's centroid lies r/6 below its centre); a small search around that guess absorbs the bias of
    the thresholded edge and of clipping at the image border. Each template is also tried 3x3-blurred
    (then thresholded), because a blurred generated square loses its corners and would otherwise read as
    a circle.
    """
    h, w = mask.shape
    if h != w:
        raise ValueError(f"fit_shape expects a square mask, as the world renders; got {h}x{w}.")
    n = float(mask.sum())
    if n == 0:
        return (0.0, math.nan, math.nan, math.nan)
    m = mask.bool().cpu()
    x0, y0 = centroid(m)
    r0 = math.sqrt(n / _AREA_PER_R2[shape])
    if shape == "triangle":
        y0 -= r0 * _TRIANGLE_DROP

    def score(cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
        cover = world.shape_mask(shape, cx, cy, r, size=h, ss=2)
        soft = torch.nn.functional.avg_pool2d(cover[None, None], 3, stride=1, padding=1)[0, 0]
        return (max(mask_iou(m, cover > 0.5), mask_iou(m, soft > 0.5)), cx, cy, r)

    # Coordinate search (radius, then x, then y): 7 templates per shape instead of a 27-point grid.
    best = max((score(x0, y0, r0 * f) for f in (0.94, 1.0, 1.06)), key=lambda fit: fit[0])
    best = max([best, *(score(best[1] + dx, best[2], best[3]) for dx in (-0.5, 0.5))], key=lambda fit: fit[0])
    return max([best, *(score(best[1], best[2] + dy, best[3]) for dy in (-0.5, 0.5))], key=lambda fit: fit[0])


def shape_class(mask: torch.Tensor) -> str | None:
    """The world shape whose fitted template has the best IoU with the mask; None for an empty mask."""
    if not bool(mask.any()):
        return None
    fits = {s: fit_shape(mask, s)[0] for s in world.SHAPES}
    return max(fits, key=lambda s: fits[s])


def subject_centre(mask: torch.Tensor, shape: str | None = None) -> tuple[float, float]:
    """The subject's template centre (x, y): the centroid, raised by r/6 for a triangle.

    WHY: position words anchor the template centre (world.scene_centre), not the area centroid, and the
    two differ only for the triangle.
    """
    x, y = centroid(mask)
    shape = shape if shape is not None else shape_class(mask)
    if shape == "triangle":
        y -= math.sqrt(float(mask.sum()) / _AREA_PER_R2["triangle"]) * _TRIANGLE_DROP
    return (x, y)


def position_class(mask: torch.Tensor, shape: str | None = None) -> str | None:
    """The position word whose anchor is nearest to the subject's centre; None for an empty mask."""
    if not bool(mask.any()):
        return None
    x, y = subject_centre(mask, shape)
    return min(world.ANCHORS, key=lambda p: (world.ANCHORS[p][0] - x) ** 2 + (world.ANCHORS[p][1] - y) ** 2)


# --- everything at once -------------------------------------------------------------------------------

def describe(rgb: torch.Tensor, palette: str = world.DEFAULT_PALETTE) -> dict:
    """All measurements of one image [3, H, W], its colours read in ``palette`` (the model's).

    Returns {"mask", "colours", "texture", "shape", "position", "centroid", "area"}; for a blank image
    the mask is empty, area 0, colours empty, and texture/shape/position None (so they never score).
    """
    mask = subject_mask(rgb)
    shape = shape_class(mask)
    fit = colour_fit(rgb, mask, palette)
    return {
        "mask": mask,
        "colours": _names_over(fit["shares"], MIN_SHARE),
        "texture": texture_class(rgb, mask, fit),
        "shape": shape,
        "position": position_class(mask, shape),
        "centroid": centroid(mask),
        "area": int(mask.sum()),
    }
