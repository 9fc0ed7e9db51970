"""Rendering of findings: what to draw on each background (specs, sampled in order in the main process) and
how (augmentation: crop and zoom, flips, intensity window and gamma; then 0-3 synthetic lesions in one
quadrant; then acquisition noise over everything, drawn deterministically wherever the job runs), with the
ground truth of every saved image."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.medsynth.backgrounds import SOURCE_BY_KEY, Source, Unit
from data_pipelines.medsynth.vocab import SOURCE_NAME, SPLITS

# --- instances ----------------------------------------------------------------------------------------------


@dataclass
class Spec:
    id: str
    split: str
    unit: str  # Unit.key
    source: str
    modality: str
    region: str
    area: tuple  # Unit.box
    seed: int
    count: int
    side: str
    position: str
    size: str
    contrast: str  # requested; the renderer may switch it if the spot is too bright/dark to show it


@dataclass
class Lesion:
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float  # radians
    measured_contrast: float  # |core - ring| mean luminance at 112 px


@dataclass
class Instance:
    """The ground truth of one saved image (one line of instances_<split>.jsonl)."""

    id: str
    image: str
    split: str
    unit: str
    source: str
    file: str
    area: list  # [x0, y0, x1, y1]: the part of the file's picture used as background, fractions of its size
    modality: str
    region: str
    image_size: int
    augment: dict  # crop [x0, y0, side] in background (area) pixels, flip_lr, flip_ud, window, gamma, noise
    count: int
    side: str | None
    position: str | None
    size: str | None
    contrast: str | None
    lesions: list[dict] = field(default_factory=list)  # asdict(Lesion)


def balanced_units(units: Sequence[Unit], split: str, n: int, rng: np.random.Generator) -> Iterator[Unit]:
    """n units of a split: modalities balanced (shuffled round robin), then a source and one of its units
    uniformly. Drawn from `rng` one unit at a time, so the caller's own draws for a unit come before the next."""
    by_modality: dict[str, dict[str, list[Unit]]] = defaultdict(lambda: defaultdict(list))
    for unit in units:
        if unit.split == split:
            by_modality[unit.modality][unit.source].append(unit)
    modalities = sorted(by_modality)
    if not modalities:
        raise ValueError(f"no background unit is assigned to split {split!r}")
    cycle = []
    for _ in range(n):
        if not cycle:
            cycle = [modalities[j] for j in rng.permutation(len(modalities))]
        modality = cycle.pop()
        sources = sorted(by_modality[modality])
        slices = by_modality[modality][sources[rng.integers(len(sources))]]
        yield slices[rng.integers(len(slices))]


def sample_specs(units: Sequence[Unit], split: str, n: int, seed: int) -> list[Spec]:
    """Units as `balanced_units` draws them, then the findings of each."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    specs = []
    for i, unit in enumerate(balanced_units(units, split, n, rng)):
        specs.append(
            Spec(
                id=f"{SOURCE_NAME}-{split}-{i:05d}",
                split=split,
                unit=unit.key,
                source=unit.source,
                modality=unit.modality,
                region=unit.region,
                area=unit.box,
                seed=int(rng.integers(2**63)),
                count=int(rng.choice(4, p=(0.4, 0.2, 0.2, 0.2))),
                side=("left", "right")[rng.integers(2)],
                position=("upper", "lower")[rng.integers(2)],
                size=("small", "large")[rng.integers(2)],
                contrast=("bright", "dark")[rng.integers(2)],
            )
        )
    return specs


# --- rendering ----------------------------------------------------------------------------------------------

SMALL_RADIUS = (0.028, 0.038)  # of the image side: 6-8.5 px at 224, i.e. 6-8.5 px wide lesions at 112
LARGE_RADIUS = (0.062, 0.08)  # 14-18 px at 224: 14-18 px wide at 112
# Lesions stay this far (fraction of the side) from the midlines, so their side and position are unambiguous.
MIDLINE_MARGIN = 0.045
EDGE_MARGIN = 0.05
GAP = 0.035  # between the cells of a cluster, so its lesions can be counted
MIN_CONTRAST = 40.0  # mean luminance difference core vs ring after resizing to 112 px
ATTEMPTS = 40  # fresh crops tried per image before giving up
BRIGHT_TARGET, DARK_TARGET = 245.0, 12.0


WINDOW_LOW = (-25.0, 35.0)  # grey levels of the loaded picture that become black ...
WINDOW_HIGH = (220.0, 280.0)  # ... and white: a window up to 1.4x narrower or 1.2x wider than the file's own
NOISE_SIGMA = (
    0.0,
    6.0,
)  # grey levels, Gaussian, added after the lesions (it covers them as it covers tissue)


def sample_augment(background: np.ndarray, source: Source, rng: np.random.Generator) -> dict:
    """Square crop (zoom 0.7-1 of the shorter side), flips where allowed, an intensity window (the grey levels
    mapped to black and white) and gamma, and Gaussian noise (its sigma and its own seed). Rounded here (the
    crop down to 1/100 px, so it stays inside the background, i.e. inside the unit's area), so the values stored
    in instances_<split>.jsonl reproduce the picture exactly."""
    h, w = background.shape[:2]
    side = rng.uniform(0.7, 1.0) * min(h, w)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    return dict(
        crop=[math.floor(float(v) * 100) / 100 for v in (x0, y0, side)],
        flip_lr=bool(source.flip_lr and rng.random() < 0.5),
        flip_ud=bool(source.flip_ud and rng.random() < 0.5),
        window=[round(rng.uniform(*WINDOW_LOW), 2), round(rng.uniform(*WINDOW_HIGH), 2)],
        gamma=round(math.exp(rng.uniform(-0.25, 0.25)), 4),
        noise=round(rng.uniform(*NOISE_SIGMA), 2),
        noise_seed=int(rng.integers(2**31)),
    )


def apply_augment(background: np.ndarray, size: int, params: dict) -> np.ndarray:
    """float32 (size, size, C) picture of a background under `params` (from sample_augment), before lesions and
    noise: crop and zoom, flips, window, gamma."""
    x0, y0, side = params["crop"]
    image = Image.fromarray(background).resize(
        (size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side)
    )
    array = np.asarray(image, dtype=np.float32)
    if params["flip_lr"]:  # flips come before any lesion, so recorded sides are those of the saved image
        array = array[:, ::-1]
    if params["flip_ud"]:
        array = array[::-1]
    low, high = params["window"]
    array = np.clip((array - low) / (high - low), 0.0, 1.0)
    array = 255.0 * array ** params["gamma"]
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(array, dtype=np.float32)


def add_noise(array: np.ndarray, params: dict) -> np.ndarray:
    """The picture with the augmentation's Gaussian noise (the same on every channel, so grey stays grey)."""
    if not params["noise"]:
        return array
    noise = np.random.default_rng(params["noise_seed"]).normal(0.0, params["noise"], array.shape[:2])
    return np.clip(array + noise.astype(np.float32)[..., None], 0, 255)


def background_picture(background: np.ndarray, size: int, params: dict) -> np.ndarray:
    """The saved picture without its lesions: what `render` drew them onto, with the same noise."""
    return add_noise(apply_augment(background, size, params), params)


def _ellipse_distance(shape, cx, cy, rx, ry, angle, scale=1.0) -> np.ndarray:
    """Normalised elliptical distance (1 on the rim) of every pixel of an image of `shape`, geometry * scale."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dx, dy = xs + 0.5 - cx * scale, ys + 0.5 - cy * scale
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / (rx * scale), (-dx * s + dy * c) / (ry * scale)
    return np.sqrt(u * u + v * v)


def _luminance(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.shape[-1] == 1 else array @ np.array([0.299, 0.587, 0.114], np.float32)


def _quadrant_box(side: str, position: str, size: int) -> tuple[float, float, float, float]:
    half, mid, edge = size / 2, MIDLINE_MARGIN * size, EDGE_MARGIN * size
    x = (edge, half - mid) if side == "left" else (half + mid, size - edge)
    y = (edge, half - mid) if position == "upper" else (half + mid, size - edge)
    return x[0], y[0], x[1], y[1]


def _place(lum, spec: Spec, contrast: str, rng, tissue: bool) -> list[tuple] | None:
    """Ellipses (cx, cy, rx, ry, angle) inside the spec's quadrant on pixels where the requested contrast can
    show (and, with `tissue`, not on empty background). One lesion may sit anywhere in the quadrant; a cluster
    takes distinct cells of the quadrant's 2x2 grid, so its lesions never touch and can be counted."""
    size = lum.shape[0]
    x0, y0, x1, y1 = _quadrant_box(spec.side, spec.position, size)
    if spec.count == 1:
        boxes = [(x0, y0, x1, y1)]
    else:
        mx, my, g = (x0 + x1) / 2, (y0 + y1) / 2, GAP * size / 2
        cells = [
            (x0, y0, mx - g, my - g),
            (mx + g, y0, x1, my - g),
            (x0, my + g, mx - g, y1),
            (mx + g, my + g, x1, y1),
        ]
        boxes = [cells[i] for i in rng.permutation(4)[: spec.count]]
    low, high = LARGE_RADIUS if spec.size == "large" else SMALL_RADIUS
    placed = []
    for bx0, by0, bx1, by1 in boxes:
        for _try in range(40):
            r = min(rng.uniform(low, high) * size, (bx1 - bx0) / 2, (by1 - by0) / 2)
            ry, angle = r * rng.uniform(0.75, 1.0), rng.uniform(0, math.pi)
            cx, cy = rng.uniform(bx0 + r, bx1 - r), rng.uniform(by0 + r, by1 - r)
            patch = lum[int(cy - ry) : int(cy + ry) + 1, int(cx - ry) : int(cx + ry) + 1]
            mean = float(patch.mean())
            fits = mean <= 170 if contrast == "bright" else mean >= 70
            if fits and (not tissue or mean >= 25):
                placed.append((cx, cy, r, ry, angle))
                break
        else:
            return None
    return placed


def _draw(array, ellipses, contrast: str, rng) -> np.ndarray:
    """Blend soft-edged, slightly textured ellipses toward white (bright) or black (dark)."""
    out = array.copy()
    target = BRIGHT_TARGET if contrast == "bright" else DARK_TARGET
    for cx, cy, rx, ry, angle in ellipses:
        d = _ellipse_distance(out.shape[:2], cx, cy, rx, ry, angle)
        t = np.clip((1.0 - d) / 0.35, 0.0, 1.0)
        alpha = t * t * (3 - 2 * t) * rng.uniform(0.8, 0.95)  # smoothstep edge, 80-95% opaque core
        alpha *= np.clip(1.0 + rng.normal(0.0, 0.08, alpha.shape), 0.0, 1.25).astype(np.float32)
        alpha = np.clip(alpha, 0.0, 1.0)[..., None]
        out = out * (1.0 - alpha) + target * alpha
    return out


def measured_contrasts(image: Image.Image, ellipses, size: int, model_side: int = 112) -> list[float]:
    """|mean core - mean surrounding ring| of each ellipse after resizing the image to `model_side` px."""
    small = np.asarray(image.convert("L").resize((model_side, model_side), Image.BILINEAR), np.float32)
    scale = model_side / size
    dists = [_ellipse_distance(small.shape, *e[:2], *e[2:4], e[4], scale) for e in ellipses]
    others = np.zeros(small.shape, bool)
    for d in dists:
        others |= d < 1.3
    values = []
    for d in dists:
        core, ring = d < 0.5, (d > 1.4) & (d < 2.2) & ~others
        if not core.any() or not ring.any():
            values.append(0.0)
        else:
            values.append(abs(float(small[core].mean()) - float(small[ring].mean())))
    return values


def render(spec: Spec, background: np.ndarray, size: int) -> tuple[Image.Image, dict]:
    """The picture and its geometry. Deterministic in (spec, background, size).

    Tries fresh crops until the lesions fit and show: first with the requested contrast on tissue, then also
    with the other contrast (a quadrant of air cannot show a dark lesion), last anywhere in the quadrant."""
    source = SOURCE_BY_KEY[spec.source]
    rng = np.random.default_rng(spec.seed)
    other = "dark" if spec.contrast == "bright" else "bright"
    for attempt in range(ATTEMPTS):
        augment = sample_augment(background, source, rng)
        array = apply_augment(background, size, augment)
        geometry = dict(augment=augment, contrast=None, lesions=[])
        if spec.count == 0:
            return _to_image(add_noise(array, augment)), geometry
        for contrast in (spec.contrast,) if attempt < 8 else (spec.contrast, other):
            ellipses = _place(_luminance(array), spec, contrast, rng, tissue=attempt < 3 * ATTEMPTS // 4)
            if ellipses is None:
                continue
            image = _to_image(add_noise(_draw(array, ellipses, contrast, rng), augment))
            measured = measured_contrasts(image, ellipses, size)
            if min(measured) >= MIN_CONTRAST:
                geometry["contrast"] = contrast
                geometry["lesions"] = [
                    asdict(Lesion(*(round(float(v), 3) for v in e), measured_contrast=round(m, 1)))
                    for e, m in zip(ellipses, measured, strict=True)
                ]
                return image, geometry
    raise RuntimeError(
        f"{spec.id}: no visible placement of {spec.count} {spec.size} lesion(s) in the {spec.position} "
        f"{spec.side} quadrant of {spec.unit} after {ATTEMPTS} crops"
    )


def _to_image(array: np.ndarray) -> Image.Image:
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


# --- worker process state and jobs --------------------------------------------------------------------------

_LIBRARY: dict[str, np.ndarray] = {}


def _init_worker(library: dict[str, np.ndarray]) -> None:
    global _LIBRARY
    _LIBRARY = library


def _render_job(job: tuple[Spec, str, int, str]) -> dict:
    spec, out_dir, size, file_label = job
    image, geometry = render(spec, _LIBRARY[spec.unit], size)
    rel = f"images/{spec.id.removeprefix(SOURCE_NAME + '-')}.png"
    image.save(Path(out_dir) / rel, format="PNG")
    instance = Instance(
        id=spec.id,
        image=rel,
        split=spec.split,
        unit=spec.unit,
        source=spec.source,
        file=file_label,
        area=list(spec.area),
        modality=spec.modality,
        region=spec.region,
        image_size=size,
        augment=geometry["augment"],
        count=spec.count,
        side=spec.side if spec.count else None,
        position=spec.position if spec.count else None,
        size=spec.size if spec.count else None,
        contrast=geometry["contrast"],
        lesions=geometry["lesions"],
    )
    return asdict(instance)
