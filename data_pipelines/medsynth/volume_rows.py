"""Volume rows: a bounded set of neighbouring axial slices of a real MRI volume, rendered through
`medllava.volumes`, with a synthetic ellipsoid lesion that spans some of them, and VQA rows about it.

Built by `python -m data_pipelines.medsynth.multi` (see there); not part of the default `make data` build.

Volumes: the NIfTI files of the medsynth catalogue that the default build shares out between train, val and test
by slices (`backgrounds.SOURCES` with split "blocks": nilearn's MNI template, nibabel's EPI volume, pydeface's mean
head). A volume's background unit here is a slab: a run of neighbouring catalogue slices of one split (the
slices between them included), so a slab holds only slices of its split's blocks and the guard slice the
catalogue drops at each change of split lies between two slabs. Slabs thinner than MIN_SHOWN slices are left out
(reported). dipy's volumes are the default build's `unseen` split (held out whole) and are not used.

Each volume instance shows N_SHOWN (fewer in a thinner slab) slices STEPS apart, inside its slab. With a lesion,
the voxels of one ellipsoid (in-plane semi-axes RADIUS_MM, its axis along the slices) are blended toward the
volume's 99th percentile (bright) or its 1st (dark), the volume is written as NIfTI bytes and rendered through
`medllava.volumes.load_volume(...).slices(indices=...)`, the same path as any volume a user gives. The ellipsoid
is drawn so that each shown slice either misses it (no voxel) or cuts a section whose radii are at least
MIN_SECTION of the largest one; the largest section has at least LARGEST_MARGIN times the voxels of the next; and
each section shows in the rendered slice (at least MIN_FOOTPRINT pixels changed by CHANGED grey levels and
`findings.MIN_CONTRAST` between the lesion and a ring around it) while the slices that miss it are unchanged.
The ground truth (instances_volume_<split>.jsonl) holds the geometry in voxels and millimetres, the lesion's voxel
count on every shown slice and what the rendering measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.medsynth.backgrounds import SOURCES, Unit
from data_pipelines.medsynth.common_rows import (
    MultiQuestion,
    candidate,
    image_stem,
    instance_head,
    multi_image_rows,
    unit_fields,
)
from data_pipelines.medsynth.findings import MIN_CONTRAST
from data_pipelines.medsynth.questions import select_vqa
from data_pipelines.medsynth.vocab import IN_DOMAIN, SOURCE_NAME
from medllava.image_roles import ImageInput, describe_images
from medllava.schema import CLOSED, OPEN

FAMILY = "volume"
AXIS = "axial"
N_SHOWN = 5  # slices shown per instance (all of a thinner slab)
MIN_SHOWN = 4  # a slab thinner than this is left out
STEPS = (1, 2, 3)  # slices between two shown ones, drawn among those that fit in the slab
MAX_SIDE = 224  # longest side of a rendered slice, pixels
RADIUS_MM = (10.0, 16.0)  # the longer in-plane semi-axis of the lesion's largest section
ASPECT = (0.75, 1.0)  # shorter over longer in-plane semi-axis
MIN_SECTION = 0.6  # a shown section's radii are at least this fraction of the largest section's
LARGEST_MARGIN = 1.1  # voxels of the largest shown section over those of the next largest
TISSUE_LEVEL = 0.25  # voxels above this fraction of the volume's 1st-99th percentile range are tissue
TISSUE_SHARE = 0.97  # of the lesion's voxels that must lie in tissue
ALPHA = (0.85, 0.95)  # how far the lesion's voxels are blended toward the target intensity
DARK_LEVEL = 0.02  # dark lesions: toward this fraction of the range (bright ones: the 99th percentile)
CHANGED = 24  # grey levels: a rendered pixel that changed this much belongs to the lesion's footprint
MIN_FOOTPRINT = 60  # rendered pixels of a visible section
LESION_SHARE = 0.7  # of the instances; the others have no lesion
ATTEMPTS = 60


def volume_sources() -> tuple:
    """The catalogue's volumes shared out between train, val and test by slices."""
    return tuple(s for s in SOURCES if s.relpath.endswith((".nii", ".nii.gz")) and s.split == "blocks")


@dataclass(frozen=True)
class Slab:
    """Neighbouring slices lo..hi (NIfTI third-axis indices, inclusive) of one volume, all of one split."""

    source: str
    split: str
    lo: int
    hi: int
    modality: str
    region: str

    @property
    def key(self) -> str:
        return f"{self.source}#{self.lo}-{self.hi}"

    @property
    def length(self) -> int:
        return self.hi - self.lo + 1


def volume_slabs(units: Sequence[Unit]) -> tuple[list[Slab], list[str]]:
    """(slabs, notes): each run of consecutive catalogue slices of one split (a guard slice, which belongs to
    no split, ends a run) of every volume source; runs thinner than MIN_SHOWN slices are left out."""
    slabs, notes = [], []
    for source in volume_sources():
        assigned = {u.index: u for u in units if u.source == source.key}
        if not assigned:
            continue
        runs, run = [], []
        for index in source.units:
            unit = assigned.get(index)
            if run and (unit is None or unit.split != run[-1].split):
                runs.append(run)
                run = []
            if unit is not None:
                run.append(unit)
        runs.append(run)
        thin = []
        for run in filter(None, runs):
            slab = Slab(source.key, run[0].split, run[0].index, run[-1].index, run[0].modality, run[0].region)
            if slab.length < MIN_SHOWN:
                thin.append(f"{slab.lo}-{slab.hi} {slab.split}")
            else:
                slabs.append(slab)
        if thin:
            notes.append(
                f"{source.key}: {len(thin)} slab(s) thinner than {MIN_SHOWN} slices left out ({', '.join(thin)})"
            )
    return slabs, notes


@dataclass
class VolumeSpec:
    id: str
    split: str
    unit: str  # Slab.key
    source: str
    modality: str
    region: str
    seed: int
    visible: int  # shown slices the lesion is to cut; 0: no lesion
    contrast: str


def sample_volume_specs(slabs: Sequence[Slab], split: str, n: int, seed: int) -> list[VolumeSpec]:
    """n instances of a split: volumes in a shuffled round robin, then one of the volume's slabs uniformly; a
    lesion in LESION_SHARE of them, cutting 1..N shown slices (uniformly)."""
    rng = np.random.default_rng([seed, IN_DOMAIN.index(split), 202])
    by_source: dict[str, list[Slab]] = {}
    for slab in slabs:
        if slab.split == split:
            by_source.setdefault(slab.source, []).append(slab)
    sources = sorted(by_source)
    if not sources:
        raise ValueError(f"no volume slab is assigned to split {split!r}")
    specs, cycle = [], []
    for i in range(n):
        if not cycle:
            cycle = [sources[j] for j in rng.permutation(len(sources))]
        candidates = by_source[cycle.pop()]
        slab = candidates[rng.integers(len(candidates))]
        lesion = rng.random() < LESION_SHARE
        shown = min(N_SHOWN, slab.length)
        specs.append(
            VolumeSpec(
                id=f"{SOURCE_NAME}-vol-{split}-{i:05d}",
                split=split,
                **unit_fields(slab),
                seed=int(rng.integers(2**63)),
                visible=int(rng.integers(1, shown + 1)) if lesion else 0,
                contrast=("bright", "dark")[rng.integers(2)],
            )
        )
    return specs


# --- the real volume and the lesioned one -------------------------------------------------------------------


@dataclass
class BaseVolume:
    """A volume file's first volume as float32 voxels, its header, and the lesion-free `medllava.volumes.Volume`
    read from the same bytes the lesioned copies are written as."""

    label: str  # package/relpath
    data: np.ndarray  # (n0, n1, n2) float32
    affine: np.ndarray
    header: object
    volume: object  # medllava.volumes.Volume
    low: float  # the volume's 1st and 99th percentile (medllava.volumes' display range)
    high: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.volume.spacing)

    def nifti_bytes(self, data: np.ndarray) -> bytes:
        import nibabel as nib

        return nib.Nifti1Image(data, self.affine, self.header).to_bytes()

    def render(self, data: np.ndarray, indices: Sequence[int]):
        """`VolumeSlices` of `data` (this volume's geometry) at display `indices`, through medllava.volumes."""
        from medllava.volumes import load_volume

        volume = load_volume(self.nifti_bytes(data), name=f"{self.label} (lesioned)", modality="MR")
        return volume.slices(indices=list(indices), axis=AXIS, max_side=MAX_SIDE)

    def display_index(self, k: int) -> int:
        """The slice number medllava.volumes gives array slice k (0 = the most inferior)."""
        ascending = self.volume.directions[2, 2] > 0
        return k if ascending else self.data.shape[2] - 1 - k


def load_base(path: Path, label: str) -> BaseVolume:
    import nibabel as nib

    from medllava.volumes import load_volume

    image = nib.load(path)
    first = (slice(None),) * 3 + (0,) * (len(image.shape) - 3)  # the first volume of a 4D file
    data = np.ascontiguousarray(np.asarray(image.dataobj[first], dtype=np.float32))
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    base = BaseVolume(label, data, image.affine, header, None, 0.0, 0.0)
    base.volume = load_volume(base.nifti_bytes(data), name=label, modality="MR")
    if base.volume.native_axis != AXIS:
        raise ValueError(f"{label}: stacked {base.volume.native_axis}ly, expected {AXIS} slices")
    base.low, base.high = base.volume.intensity_range()
    return base


def ellipsoid(geometry: dict, spacing: Sequence[float], shape: Sequence[int]) -> tuple[tuple, np.ndarray]:
    """(box, mask): the voxels strictly inside the lesion, as a boolean mask of the array box (3 slices)."""
    ci, cj, cz = geometry["center_voxel"]
    a, b = geometry["semi_axes_mm"]
    rz, angle = geometry["semi_axis_slices"], geometry["angle"]
    si, sj = spacing[0], spacing[1]
    reach = a + 1.0
    lo = [
        max(0, math.floor(ci - reach / si)),
        max(0, math.floor(cj - reach / sj)),
        max(0, math.floor(cz - rz)),
    ]
    hi = [
        min(shape[0], math.ceil(ci + reach / si) + 1),
        min(shape[1], math.ceil(cj + reach / sj) + 1),
        min(shape[2], math.ceil(cz + rz) + 1),
    ]
    i, j, k = np.meshgrid(*(np.arange(lo[d], hi[d]) for d in range(3)), indexing="ij")
    x, y = (i - ci) * si, (j - cj) * sj
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    inside = (u / a) ** 2 + (v / b) ** 2 + ((k - cz) / rz) ** 2 < 1.0
    return tuple(slice(lo[d], hi[d]) for d in range(3)), inside


def section_voxels(box: tuple, mask: np.ndarray, ks: Sequence[int]) -> list[int]:
    """The lesion's voxels on each array slice k of `ks`."""
    first = box[2].start
    return [int(mask[:, :, k - first].sum()) if box[2].start <= k < box[2].stop else 0 for k in ks]


def draw_geometry(base: BaseVolume, ks: Sequence[int], m: int, rng) -> dict | None:
    """An ellipsoid that cuts exactly `m` neighbouring slices of the shown `ks` (array indices), lies in tissue
    and has one clearly largest section; None when this draw does not fit."""
    n = len(ks)
    step = abs(ks[1] - ks[0]) if n > 1 else 1
    a0 = int(rng.integers(0, n - m + 1))
    visible = list(ks[a0 : a0 + m])
    middle = (visible[0] + visible[-1]) / 2
    if m % 2:
        cz = middle + rng.uniform(-0.15, 0.15) * step
    else:  # between two shown slices: moved toward one of them, so one section is the largest
        cz = middle + rng.choice((-1.0, 1.0)) * rng.uniform(0.25, 0.45) * step
    reach_in = max(abs(k - cz) for k in visible)
    outside = [abs(k - cz) for k in ks if k not in visible]
    lower = max(reach_in / math.sqrt(1 - MIN_SECTION**2), 0.5)
    upper = min([*outside, 1.25 * lower])  # thin enough that neighbouring sections differ
    if lower >= upper:
        return None
    rz = float(rng.uniform(lower, upper))
    a = float(rng.uniform(*RADIUS_MM))
    b = a * float(rng.uniform(*ASPECT))
    angle = float(rng.uniform(0, math.pi))
    plane = base.data[:, :, int(round(cz))]
    tissue_level = base.low + TISSUE_LEVEL * (base.high - base.low)
    candidates = np.argwhere(plane >= tissue_level)
    if not len(candidates):
        return None
    ci, cj = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 2)
    geometry = dict(
        center_voxel=[round(float(ci), 3), round(float(cj), 3), round(float(cz), 3)],
        semi_axes_mm=[round(a, 3), round(b, 3)],
        semi_axis_slices=round(rz, 3),
        angle=round(angle, 4),
    )
    box, mask = ellipsoid(geometry, base.spacing, base.data.shape)
    values = base.data[box][mask]
    if not values.size or np.mean(values >= tissue_level) < TISSUE_SHARE:
        return None
    counts = section_voxels(box, mask, ks)
    if [c > 0 for c in counts] != [k in visible for k in ks]:
        return None
    ranked = sorted(counts, reverse=True)
    if len(ranked) > 1 and ranked[1] and ranked[0] < LARGEST_MARGIN * ranked[1]:
        return None
    return geometry


def _ring_contrast(image: np.ndarray, footprint: np.ndarray) -> float:
    """|mean inside the footprint - mean of a ring 3-8 px around it| of a rendered slice."""
    from scipy import ndimage

    near = ndimage.binary_dilation(footprint, iterations=3)
    ring = ndimage.binary_dilation(footprint, iterations=8) & ~near
    if not footprint.any() or not ring.any():
        return 0.0
    return abs(float(image[footprint].mean()) - float(image[ring].mean()))


def _grey(shown) -> list[np.ndarray]:
    return [np.asarray(image.convert("L"), dtype=np.float32) for image in shown.images]


def shown_window(slab: Slab, base: BaseVolume, rng) -> tuple[int, list[int]]:
    """(step, array indices in the order they are shown): N_SHOWN slices (all of a thinner slab), `step` apart,
    inside the slab."""
    n = min(N_SHOWN, slab.length)
    steps = [s for s in STEPS if (n - 1) * s + 1 <= slab.length]
    step = steps[int(rng.integers(len(steps)))]
    k0 = int(rng.integers(slab.lo, slab.hi - (n - 1) * step + 1))
    return step, sorted((k0 + i * step for i in range(n)), key=base.display_index)


def render_volume(spec: VolumeSpec, slab: Slab, base: BaseVolume) -> tuple[object, dict]:
    """(VolumeSlices, truth) of one instance. Deterministic in (spec, slab, volume).

    Draws a window of shown slices and a lesion until the lesion fits (see `draw_geometry`) and shows on every
    slice it cuts and nowhere else; half way through it also tries the other contrast."""
    rng = np.random.default_rng(spec.seed)
    other = "dark" if spec.contrast == "bright" else "bright"
    attempts = ATTEMPTS if spec.visible else 1
    for attempt in range(attempts):
        step, ks = shown_window(slab, base, rng)
        indices = [base.display_index(k) for k in ks]
        geometry = draw_geometry(base, ks, spec.visible, rng) if spec.visible else None
        if spec.visible and geometry is None:
            continue
        plain = base.volume.slices(indices=indices, axis=AXIS, max_side=MAX_SIDE)
        truth = dict(
            slab=[slab.lo, slab.hi],
            array_indices=ks,
            indices=indices,
            positions_mm=plain.positions_mm,
            step_slices=step,
            voxel_mm=[round(s, 5) for s in base.spacing],
            volume_shape=list(base.data.shape),
            prompt_text=plain.prompt_text,
            lesion=None,
        )
        if not spec.visible:
            return plain, truth
        contrast = spec.contrast if attempt < ATTEMPTS // 2 else other
        alpha = float(rng.uniform(*ALPHA))
        target = base.high if contrast == "bright" else base.low + DARK_LEVEL * (base.high - base.low)
        box, mask = ellipsoid(geometry, base.spacing, base.data.shape)
        # cheap first: the lesion must move its own tissue far enough from where it was to be seen
        moved = alpha * abs(target - float(base.data[box][mask].mean())) * 255 / (base.high - base.low)
        if moved < MIN_CONTRAST * 1.5:
            continue
        data = base.data.copy()
        region = data[box]
        region[mask] = (1 - alpha) * region[mask] + alpha * target
        shown = base.render(data, indices)
        counts = section_voxels(box, mask, ks)
        pixels, contrasts = [], []
        for count, before, after in zip(counts, _grey(plain), _grey(shown), strict=True):
            footprint = np.abs(after - before) >= CHANGED
            pixels.append(int(footprint.sum()))
            contrasts.append(round(_ring_contrast(after, footprint), 1) if count else None)
        shows = all(
            (p >= MIN_FOOTPRINT and c >= MIN_CONTRAST) if v else p == 0
            for v, p, c in zip(counts, pixels, contrasts, strict=True)
        )
        if not shows or int(np.argmax(pixels)) != int(np.argmax(counts)):
            continue
        truth["lesion"] = dict(
            **geometry,
            contrast=contrast,
            alpha=round(alpha, 4),
            section_voxels=counts,
            section_mm2=[round(c * base.spacing[0] * base.spacing[1], 1) for c in counts],
            visible=[c > 0 for c in counts],
            visible_count=sum(c > 0 for c in counts),
            largest=int(np.argmax(counts)) + 1,
            rendered_pixels=pixels,
            measured_contrast=contrasts,
        )
        return shown, truth
    raise RuntimeError(
        f"{spec.id}: no lesion cutting exactly {spec.visible} shown slices of {slab.key} that lies in tissue "
        f"and shows on every slice it cuts after {ATTEMPTS} draws"
    )


def render_volume_job(spec: VolumeSpec, slab: Slab, base: BaseVolume, out_dir: Path) -> dict:
    """Render one instance, save its slices as PNGs under out_dir/images/ and return its ground truth."""
    shown, truth = render_volume(spec, slab, base)
    described = ImageInput.from_volume(shown)
    stem = image_stem(spec.id)
    images = []
    for number, image in enumerate(shown.images, start=1):
        name = f"images/{stem}-{number}.png"
        image.convert("L").save(Path(out_dir) / name, format="PNG")  # grey: the three channels are equal
        images.append(name)
    return dict(
        instance_head(spec, FAMILY, base.label),
        modality=spec.modality,
        region=spec.region,
        images=images,
        axis=shown.axis,
        direction=shown.direction,
        # what the prompt says about the slices: ImageInput.from_volume of the rendering, and its line
        volume_input=dict(
            n_images=described.n_images,
            slices=described.slices,
            modality=described.modality,
            channels=list(described.channels),
        ),
        prompt_line=describe_images([described]),
        **truth,
    )


# --- questions and rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeQuestion(MultiQuestion):
    needs_lesion: bool


QUESTIONS = (
    VolumeQuestion(
        "VIS_COUNT",
        OPEN,
        ("On how many of the shown slices is the lesion visible?", "How many of the slices show the lesion?"),
        0.35,
        True,
    ),
    VolumeQuestion(
        "LARGEST",
        OPEN,
        ("Which slice shows the lesion largest?", "On which slice does the lesion look largest?"),
        0.35,
        True,
    ),
    VolumeQuestion(
        "PRES",
        CLOSED,
        ("Is there a lesion in this volume?", "Do these slices show a lesion?"),
        0.30,
        False,
    ),
)


def presence_statement(instance: dict) -> str:
    lesion = instance["lesion"]
    if lesion is None:
        return "There is no lesion in this volume."
    n = len(instance["images"])
    return f"There is a lesion on {lesion['visible_count']} of the {n} slices shown."


def ask_volume(kind: VolumeQuestion, instance: dict, rnd: random.Random) -> dict | None:
    lesion = instance["lesion"]
    if kind.needs_lesion and lesion is None:
        return None
    statement = None
    if kind.question_type == "VIS_COUNT":
        answer = str(lesion["visible_count"])
    elif kind.question_type == "LARGEST":
        answer = str(lesion["largest"])  # the image number the prompt's "Images 1-N" gives the slice
    else:
        answer, statement = ("yes" if lesion else "no"), presence_statement(instance)
    return candidate(kind, instance, rnd, answer, statement)


def select_volume_questions(instances: Sequence[dict], n: int, rnd: random.Random) -> list[dict]:
    """n questions in the kinds' shares, answers balanced within each kind; a kind short of candidates leaves
    its rows to the others; within an answer the volumes as even as possible."""
    return select_vqa(
        instances, n, rnd, QUESTIONS, candidate=ask_volume, spread=lambda c: c["instance"]["source"]
    )


def volume_input(instance: dict) -> ImageInput:
    """The stored `ImageInput.from_volume` of the instance's rendering."""
    fields = instance["volume_input"]
    return ImageInput(**{**fields, "channels": tuple(fields["channels"])})


def volume_rows(picked: Sequence[dict], split: str) -> list[dict]:
    """VQA rows (`common_rows.multi_image_rows`): the shown slices in order, the line of `medllava.image_roles`
    ("Images 1-5: MR volume. Slices (axial, inferior to superior, mm from the first): 0, 2, 4, 6, 8.") before the
    question; the CLOSED answer stated, OPEN ones a number."""
    return multi_image_rows(
        picked, split, "vol", images=lambda inst: inst["images"], inputs=lambda inst: [volume_input(inst)]
    )
