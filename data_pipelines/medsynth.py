"""medsynth: a fully labelled medical VQA starter set, built offline from real medical images that packages ship.

Usage:
    python -m data_pipelines.medsynth --out data/medsynth --seed 0            # the default build (`make data`)
    python -m data_pipelines.medsynth --out /tmp/ms --seed 1 --size 0.05      # a small build (tests, smoke runs)

Backgrounds are real images (DICOM CT/MRI/X-ray/ultrasound/nuclear medicine from pydicom and pydicom-data,
brain MRI volumes from nibabel and nilearn, fundus and histology photographs from scikit-image), loaded only
through `medllava.processing.load_image`. Modality and body region come from the DICOM tags (read through
`dicom_summary`, which never exposes identifiers) or, for files whose tags are silent, from the file's known
nature. Each background is augmented (crop/zoom, flips only where they are anatomically harmless, intensity
jitter) and gets 0-3 synthetic lesions with exact ground truth: count, size (small/large), side (left/right of
the IMAGE, i.e. the viewer's left, not the patient's), position (upper/lower half) and contrast (brighter or
darker than the surrounding tissue). All lesions of one image lie in one quadrant, so every attribute has one
value. Placement happens after flipping, so the recorded sides are those of the saved picture.

Output, per split (train/val/test): DIR/captions_<split>.jsonl (stage 1), DIR/instruct_<split>.jsonl (stage 2,
2-4 turns), DIR/vqa_<split>.jsonl (stage 3: CLOSED yes/no balanced per question type, OPEN short canonical
answers), DIR/grpo_<split>.jsonl (prompt rows with a verifiable `solution`, incl. lettered CHOICE questions),
DIR/instances_<split>.jsonl (the ground truth of every image: source, area, crop, flips, lesion geometry), images
as PNG under DIR/images/ and DIR/README.md with the counts. A background unit (source file + frame/slice + area
of the picture) belongs to exactly one split: volumes and clips are shared out by slices or frames, and a file that
is the only one of its kind is cut into regions that do not overlap (a gap is left out between them), so every
modality is in train, val and test. The same seed gives byte-identical files whatever --num-workers is.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing as mp
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.common import format_table, progress
from medllava.processing import dicom_summary, load_image
from medllava.schema import conversation, make_vqa_row, message, normalise_text, write_jsonl

SOURCE_NAME = "medsynth"
SPLITS = ("train", "val", "test")
STAGES = ("captions", "instruct", "vqa", "grpo")
# Default sizes, fitted to a ~60-minute CPU curriculum at 112 px (shared/PERFORMANCE.md: ~1.5-2k samples/stage).
# Test: 40 images per modality and enough VQA rows (with more modality questions, see TEST_SHARES) for >= 20
# modality questions per modality.
DEFAULT_INSTANCES = {"train": 1500, "val": 160, "test": 280}
DEFAULT_ROWS = {
    "captions": {"train": 1500, "val": 100, "test": 150},
    "instruct": {"train": 1000, "val": 100, "test": 150},
    # train: ~8 questions per image, merged into conversations by data_pipelines.group_turns for stage 3
    "vqa": {"train": 12000, "val": 300, "test": 600},
    "grpo": {"train": 600, "val": 100, "test": 200},
}

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: canonical answers (lowercase, short) and the phrases used in sentences
# ---------------------------------------------------------------------------------------------------------------

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound", "nuclear medicine", "fundus photograph", "histology")
DICOM_MODALITY = {
    "CT": "CT",
    "MR": "MRI",
    "CR": "X-ray",
    "DX": "X-ray",
    "US": "ultrasound",
    "NM": "nuclear medicine",
}
MODALITY_PHRASE = {
    "CT": "a CT image",
    "MRI": "an MRI image",
    "X-ray": "an X-ray",
    "ultrasound": "an ultrasound image",
    "nuclear medicine": "a nuclear medicine scan",
    "fundus photograph": "a fundus photograph",
    "histology": "a histology image",
}
MODALITY_ASKED = {  # noun phrases for closed questions "Is this ...?"
    "CT": ("a CT scan", "a CT image", "a computed tomography image"),
    "MRI": ("an MRI scan", "an MR image", "a magnetic resonance image"),
    "X-ray": ("an X-ray", "a radiograph", "a plain X-ray image"),
    "ultrasound": ("an ultrasound image", "a sonogram", "an ultrasound scan"),
    "nuclear medicine": ("a nuclear medicine scan", "a scintigram", "a nuclear medicine image"),
    "fundus photograph": ("a fundus photograph", "a retinal photograph", "a fundus image"),
    "histology": ("a histology image", "a microscopy image of tissue", "a histological slide"),
}
REGION_PHRASE = {
    "head": "the head",
    "spine": "the spine",
    "abdomen": "the abdomen",
    "shoulder": "the shoulder",
    "chest": "the chest",
    "leg": "the leg",
    "lymph node": "a lymph node",
    "heart": "the heart",
    "pelvis": "the pelvis",
    "whole body": "the whole body",
    "eye": "the retina",
    "colon": "colon tissue",
}
# Region from DICOM description tags: first match wins, BodyPartExamined searched before the descriptions.
REGION_KEYWORDS = (
    (r"tibia|fibula|femur|knee|ankle|\bleg\b", "leg"),
    (r"shoulder", "shoulder"),
    (r"\bhead\b|brain|skull", "head"),
    (r"chest|thorax|lung", "chest"),
    (r"pancrea|abdom|liver|kidney", "abdomen"),
    (r"echocardiogra|heart|cardiac", "heart"),
    (r"pelvi", "pelvis"),
    (r"whole ?body", "whole body"),
    (r"spine", "spine"),
)
CONTRAST_TERMS = {  # modality-specific words for captions and conversations; VQA answers stay "brighter"/"darker"
    "CT": ("hyperdense", "hypodense"),
    "MRI": ("hyperintense", "hypointense"),
    "ultrasound": ("hyperechoic", "hypoechoic"),
    "X-ray": ("radiopaque", "radiolucent"),
    "nuclear medicine": ("hot", "photopenic"),
}
COUNT_WORDS = {0: "no", 1: "one", 2: "two", 3: "three"}
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")

# ---------------------------------------------------------------------------------------------------------------
# The background catalogue: real images shipped inside installed packages
# ---------------------------------------------------------------------------------------------------------------

PACKAGE_DIRS = {  # package -> (importable module, data folder inside it); located without importing the module
    "pydicom": ("pydicom", "data/test_files"),
    "pydicom-data": ("data_store", "data"),
    "scikit-image": ("skimage", "data"),
    "nibabel": ("nibabel", "tests/data"),
    "nilearn": ("nilearn", "datasets/data"),
}


@dataclass(frozen=True)
class Source:
    """One real image file. `split` is "train"/"val"/"test" for a single-slice file held out whole, "blocks" to
    share the file's frames/slices between splits in contiguous blocks (one guard unit dropped at each split
    change), or "regions" to cut its imaging area into the non-overlapping `regions`, one split each."""

    key: str
    package: str
    relpath: str
    modality: str  # expected; checked against the DICOM Modality tag
    region: str | None  # the file's known nature; None: from the DICOM tags (both given: they must agree)
    split: str
    units: tuple = (None,)  # frames (DICOM) or axial slices (NIfTI); None: the loader's default
    roi: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # imaging area (fractions), text bands out
    flip_lr: bool = False  # left-right flip anatomically harmless (no situs, text or side marker)
    flip_ud: bool = False
    regions: tuple = ()  # ((split, (x0, y0, x1, y1) as fractions of the roi), ...) for split == "regions"
    note: str = ""


REGION_GAP = 0.04  # of the imaging area's side, left out between two regions (the guard slice of a picture)


def bands(axis: str, splits: Sequence[str]) -> tuple:
    """Equal bands side by side (axis "x") or stacked (axis "y"), one split each; neighbouring bands of the same
    split are merged and REGION_GAP is left out between two regions."""
    n, regions, start = len(splits), [], 0
    for end in range(1, n + 1):
        if end < n and splits[end] == splits[start]:
            continue
        lo = start / n + (REGION_GAP / 2 if start else 0.0)
        hi = end / n - (REGION_GAP / 2 if end < n else 0.0)
        regions.append((splits[start], (lo, 0.0, hi, 1.0) if axis == "x" else (0.0, lo, 1.0, hi)))
        start = end
    return tuple(regions)


def half_and_quarters(train_half: str) -> tuple:
    """Train: one half ("left", "right", "top" or "bottom") of the imaging area; val and test: the two quarters
    of the other half. All three have the same shorter side, so a crop of 0.7-1 of it zooms alike in every split."""
    a, b = 0.5 - REGION_GAP / 2, 0.5 + REGION_GAP / 2
    left = (("train", (0.0, 0.0, a, 1.0)), ("val", (b, 0.0, 1.0, a)), ("test", (b, b, 1.0, 1.0)))
    layouts = {
        "left": left,
        "right": tuple((split, (1 - x1, y0, 1 - x0, y1)) for split, (x0, y0, x1, y1) in left),
        "top": tuple((split, (y0, x0, y1, x1)) for split, (x0, y0, x1, y1) in left),  # transposed
        "bottom": tuple((split, (y0, 1 - x1, y1, 1 - x0)) for split, (x0, y0, x1, y1) in left),
    }
    if train_half not in layouts:
        raise ValueError(f"train_half must be one of {sorted(layouts)}, not {train_half!r}")
    return layouts[train_half]


# Encodings of the same picture are listed once (693_UNCR, not 693_UNCI/693_J2KI/693_J2KR; US1_UNCR, not
# US1_J2K*/examples_jpeg2k/examples_rgb_color; JPEG2000_UNC, not JPEG2000/JPEG-LL/JPGExtended; examples_ybr_color,
# not color3d_jpeg_baseline, the same clip, which decodes all 120 frames per call). Left out on purpose: RG1 (chest
# X-ray), MR-SIEMENS-DICOM-WithOverlays/examples_overlay (liver MRI) and microaneurysms.png (fundus) show real
# round lesions or dots that would contradict the synthetic lesion labels; OBXXXX1A/examples_palette are nearly
# empty; eCT_Supplemental is a perfusion map; MR_small's region is unknown; the 16x16 dicomdir thumbnails and the
# test patterns are not images. A file that is the only one of its modality (X-ray, nuclear medicine, fundus,
# histology), or that alone gives a modality its body region in val/test, is cut into regions; the small ones
# (CT_small, 128 px; the ALOKA pelvis panel) stay whole in train, the second head CT and the TEE clip are held
# out whole.
# fmt: off
SOURCES = (
    Source("ct-head-693", "pydicom-data", "693_UNCR.dcm", "CT", "head", "regions", flip_lr=True,
           regions=half_and_quarters("left"),
           note="axial head CT; tags name no region; shows real subdural collections (not a focal lesion)"),
    Source("ct-head-lv2", "pydicom", "J2K_pixelrep_mismatch.dcm", "CT", None, "test", flip_lr=True),
    Source("ct-spine", "pydicom", "CT_small.dcm", "CT", "spine", "train", flip_lr=True,
           note="axial CT through a thoracic vertebra; tags name no region"),
    Source("ct-abdomen", "pydicom-data", "explicit_VR-UN.dcm", "CT", None, "regions",
           regions=half_and_quarters("left")),
    Source("mr-brain-mni", "nilearn", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "MRI", "head", "blocks",
           units=tuple(range(40, 152, 3)), flip_lr=True, note="MNI ICBM152 T1 template, axial slices"),
    Source("mr-brain-epi", "nibabel", "example4d.nii.gz", "MRI", "head", "blocks", units=tuple(range(3, 21)),
           flip_lr=True, note="EPI brain volume, axial slices"),
    Source("mr-head-emri", "pydicom-data", "emri_small.dcm", "MRI", None, "blocks", units=tuple(range(10))),
    Source("mr-shoulder", "pydicom-data", "MR2_UNCR.dcm", "MRI", None, "regions", roi=(0.1, 0.1, 1.0, 0.9),
           flip_lr=True, regions=half_and_quarters("right"),
           note="black margins cut off; val and test: the humeral head and shaft quarters"),
    Source("xr-leg", "pydicom-data", "RG3_UNCR.dcm", "X-ray", None, "regions", roi=(0.26, 0.0, 0.72, 0.55),
           flip_lr=True, regions=half_and_quarters("top"),
           note="exposed strip, mid-shaft only: the distal tibia (a real fibroma), the side marker and the blank "
                "collimated margins are cut off"),
    Source("us-lymph-node", "pydicom-data", "US1_UNCR.dcm", "ultrasound", "lymph node", "regions",
           roi=(0.05, 0.24, 0.94, 0.69), regions=bands("x", ("train", "val", "test")),
           note="region from the burned-in label; text bands cut off"),
    Source("us-heart-echo", "pydicom", "examples_ybr_color.dcm", "ultrasound", "heart", "blocks",
           units=tuple(range(30)), roi=(0.2, 0.06, 0.88, 0.86), note="apical four-chamber echo clip"),
    Source("us-heart-tee", "pydicom-data", "color-px.dcm", "ultrasound", None, "val", roi=(0.05, 0.0, 0.95, 1.0)),
    Source("us-pelvis", "pydicom-data", "gdcm-US-ALOKA-16.dcm", "ultrasound", "pelvis", "train",
           roi=(0.06, 0.2, 0.52, 0.86), note="region from the burned-in label; left panel only"),
    Source("nm-bone-scan", "pydicom-data", "JPEG2000_UNC.dcm", "nuclear medicine", None, "regions",
           roi=(0.0, 0.08, 1.0, 0.9), flip_lr=True, regions=bands("y", ("train", "test", "train", "val")),
           note="whole-body scan, empty ends cut off; head-chest and thighs train, abdomen-pelvis test, legs val"),
    Source("fundus-retina", "scikit-image", "retina.jpg", "fundus photograph", "eye", "regions", flip_lr=True,
           regions=half_and_quarters("left")),
    Source("histology-ihc", "scikit-image", "ihc.png", "histology", "colon", "regions", flip_lr=True,
           flip_ud=True, regions=half_and_quarters("left"), note="IHC-stained colonic glands"),
)
# fmt: on
BLOCK_PATTERN = ("train", "train", "test", "train", "val", "train", "train", "test", "train", "train")


WHOLE = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Unit:
    """A background: one frame/slice of one source file, or one region of it. It belongs to exactly one split."""

    source: str
    index: int | None
    split: str
    modality: str
    region: str  # body region
    box: tuple[float, float, float, float] = WHOLE  # area used, fractions of the file's picture
    part: int | None = None  # which of the source's regions

    @property
    def key(self) -> str:
        key = self.source if self.index is None else f"{self.source}#{self.index}"
        return key if self.part is None else f"{key}@{self.part}"


def region_box(roi: Sequence[float], box: Sequence[float]) -> tuple[float, float, float, float]:
    """A box given as fractions of the roi, as fractions of the whole picture (rounded: stored in the output)."""
    x0, y0, x1, y1 = roi
    return tuple(
        round(v, 6)
        for v in (
            x0 + box[0] * (x1 - x0),
            y0 + box[1] * (y1 - y0),
            x0 + box[2] * (x1 - x0),
            y0 + box[3] * (y1 - y0),
        )
    )


def pixel_box(box: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box of fractions as (left, top, right, bottom) pixels of a picture of `size` (width, height)."""
    w, h = size
    return round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)


def package_file(package: str, relpath: str) -> Path | None:
    """The file inside an installed package (found with importlib, without importing it); None if missing."""
    module, folder = PACKAGE_DIRS[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / folder / relpath
    return path if path.is_file() else None


def region_from_tags(tags: dict) -> str | None:
    for field_name in ("BodyPartExamined", "StudyDescription", "SeriesDescription"):
        text = str(tags.get(field_name, "")).lower()
        for pattern, region in REGION_KEYWORDS:
            if re.search(pattern, text):
                return region
    return None


def describe(source: Source, path: Path) -> tuple[str, str]:
    """(modality, region) of a file: DICOM tags where they say it, else the file's known nature."""
    modality, region = source.modality, source.region
    if path.suffix.lower() == ".dcm":
        import pydicom

        tags = dicom_summary(pydicom.dcmread(path, stop_before_pixels=True))  # technical tags only
        tag_modality = DICOM_MODALITY.get(str(tags.get("Modality", "")))
        if tag_modality != source.modality:
            raise ValueError(f"{path}: DICOM Modality {tags.get('Modality')!r} is not {source.modality}")
        tag_region = region_from_tags(tags)
        if tag_region and region and tag_region != region:
            raise ValueError(f"{path}: tags say region {tag_region!r}, the catalogue says {region!r}")
        region = tag_region or region
    if region not in REGION_PHRASE:
        raise ValueError(f"{path}: no body region from the tags or the catalogue (got {region!r})")
    return modality, region


def block_splits(units: Sequence) -> dict:
    """unit -> split for a volume or clip: contiguous blocks in BLOCK_PATTERN order; at each change of split
    the first unit of the new block is left out, so neighbouring slices never land in two splits."""
    block = max(2, math.ceil(len(units) / len(BLOCK_PATTERN)))
    assigned, previous = {}, None
    for b, start in enumerate(range(0, len(units), block)):
        split = BLOCK_PATTERN[b % len(BLOCK_PATTERN)]
        members = list(units[start : start + block])
        if previous is not None and split != previous:
            members = members[1:]  # guard
        assigned.update({u: split for u in members})
        previous = split
    return assigned


def catalogue(sources: Sequence[Source] = SOURCES) -> tuple[list[Unit], dict[str, Path], list[str]]:
    """(units, source key -> file, notes on what was left out). A missing package is reported, not fatal."""
    units, files, notes = [], {}, []
    for source in sources:
        path = package_file(source.package, source.relpath)
        if path is None:
            notes.append(f"{source.key}: {source.package}/{source.relpath} not installed, skipped")
            continue
        modality, region = describe(source, path)
        files[source.key] = path
        if source.split == "blocks":
            assigned = block_splits(source.units)
            guards = len(source.units) - len(assigned)
            if guards:
                notes.append(f"{source.key}: {guards} guard slice(s) between splits left out")
            units += [
                Unit(source.key, i, assigned[i], modality, region, source.roi)
                for i in source.units
                if i in assigned
            ]
        elif source.split == "regions":
            if {split for split, _ in source.regions} != set(SPLITS):
                raise ValueError(f"{source.key}: regions must give every split one, got {source.regions}")
            notes.append(
                f"{source.key}: cut into {len(source.regions)} regions "
                f"({', '.join(split for split, _ in source.regions)}), {REGION_GAP:.0%} of the side left out "
                "between them"
            )
            units += [
                Unit(source.key, i, split, modality, region, region_box(source.roi, box), part)
                for part, (split, box) in enumerate(source.regions)
                for i in source.units
            ]
        else:
            units += [Unit(source.key, i, source.split, modality, region, source.roi) for i in source.units]
    return units, files, notes


SOURCE_BY_KEY = {s.key: s for s in SOURCES}

# ---------------------------------------------------------------------------------------------------------------
# Backgrounds: load once (through medllava's loader), crop to the imaging area, cap the resolution
# ---------------------------------------------------------------------------------------------------------------

BACKGROUND_SIDE = 448  # shorter side kept in memory: 2x headroom over the 224 px working size


def load_background(job: tuple[Unit, str]) -> np.ndarray:
    """uint8 (H, W) for grey images, (H, W, 3) for colour ones: the unit's area of its file, nothing outside it
    (cut before resizing, so no resampling reaches across a region's edge)."""
    unit, path = job
    if path.endswith((".nii", ".nii.gz")):
        image = load_image(path, slice_index=unit.index)
    else:
        image = load_image(path, frame=unit.index)
    image = image.crop(pixel_box(unit.box, image.size))
    scale = BACKGROUND_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    array = np.asarray(image)
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        return np.ascontiguousarray(array[..., 0])
    return array


# ---------------------------------------------------------------------------------------------------------------
# Instances: what to draw (sampled in order in the main process) and how (rendered anywhere, deterministically)
# ---------------------------------------------------------------------------------------------------------------


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
    augment: dict  # crop [x0, y0, side] in background (area) pixels, flip_lr, flip_ud, gamma, gain, shift
    count: int
    side: str | None
    position: str | None
    size: str | None
    contrast: str | None
    lesions: list[dict] = field(default_factory=list)  # asdict(Lesion)


def sample_specs(units: Sequence[Unit], split: str, n: int, seed: int) -> list[Spec]:
    """Modalities balanced (shuffled round robin), then a source and one of its units uniformly."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    by_modality: dict[str, dict[str, list[Unit]]] = defaultdict(lambda: defaultdict(list))
    for unit in units:
        if unit.split == split:
            by_modality[unit.modality][unit.source].append(unit)
    modalities = sorted(by_modality)
    if not modalities:
        raise ValueError(f"no background unit is assigned to split {split!r}")
    specs, cycle = [], []
    for i in range(n):
        if not cycle:
            cycle = [modalities[j] for j in rng.permutation(len(modalities))]
        modality = cycle.pop()
        sources = sorted(by_modality[modality])
        slices = by_modality[modality][sources[rng.integers(len(sources))]]
        unit = slices[rng.integers(len(slices))]
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


# --- rendering ---------------------------------------------------------------------------------------------------

SMALL_RADIUS = (0.028, 0.038)  # of the image side: 6-8.5 px at 224, i.e. 6-8.5 px wide lesions at 112
LARGE_RADIUS = (0.062, 0.08)  # 14-18 px at 224: 14-18 px wide at 112
# Lesions stay this far (fraction of the side) from the midlines, so their side and position are unambiguous.
MIDLINE_MARGIN = 0.045
EDGE_MARGIN = 0.05
GAP = 0.035  # between the cells of a cluster, so its lesions can be counted
MIN_CONTRAST = 40.0  # mean luminance difference core vs ring after resizing to 112 px
ATTEMPTS = 40  # fresh crops tried per image before giving up
BRIGHT_TARGET, DARK_TARGET = 245.0, 12.0


def sample_augment(background: np.ndarray, source: Source, rng: np.random.Generator) -> dict:
    """Square crop (zoom 0.7-1 of the shorter side), flips where allowed, gamma/gain/shift intensity jitter.
    Rounded here (the crop down to 1/100 px, so it stays inside the background, i.e. inside the unit's area),
    so the values stored in instances_<split>.jsonl reproduce the picture exactly."""
    h, w = background.shape[:2]
    side = rng.uniform(0.7, 1.0) * min(h, w)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    return dict(
        crop=[math.floor(float(v) * 100) / 100 for v in (x0, y0, side)],
        flip_lr=bool(source.flip_lr and rng.random() < 0.5),
        flip_ud=bool(source.flip_ud and rng.random() < 0.5),
        gamma=round(math.exp(rng.uniform(-0.25, 0.25)), 4),
        gain=round(rng.uniform(0.9, 1.1), 4),
        shift=round(rng.uniform(-10, 10), 2),
    )


def apply_augment(background: np.ndarray, size: int, params: dict) -> np.ndarray:
    """float32 (size, size, C) picture of a background under `params` (from sample_augment)."""
    x0, y0, side = params["crop"]
    image = Image.fromarray(background).resize(
        (size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side)
    )
    array = np.asarray(image, dtype=np.float32)
    if params["flip_lr"]:  # flips come before any lesion, so recorded sides are those of the saved image
        array = array[:, ::-1]
    if params["flip_ud"]:
        array = array[::-1]
    array = np.clip(255.0 * (array / 255.0) ** params["gamma"] * params["gain"] + params["shift"], 0, 255)
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(array, dtype=np.float32)


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
            return _to_image(array), geometry
        for contrast in (spec.contrast,) if attempt < 8 else (spec.contrast, other):
            ellipses = _place(_luminance(array), spec, contrast, rng, tissue=attempt < 3 * ATTEMPTS // 4)
            if ellipses is None:
                continue
            image = _to_image(_draw(array, ellipses, contrast, rng))
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


# --- worker process state and jobs ---------------------------------------------------------------------------------

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


def _pool_map(fn: Callable, jobs: list, workers: int, desc: str, initargs=None) -> list:
    """Ordered map with a progress bar; in-process when workers <= 1."""
    if workers <= 1:
        if initargs is not None:
            _init_worker(*initargs)
        return [fn(job) for job in progress(jobs, desc, total=len(jobs), unit="img")]
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)
    kwargs = dict(initializer=_init_worker, initargs=initargs) if initargs is not None else {}
    with context.Pool(workers, **kwargs) as pool:
        return list(progress(pool.imap(fn, jobs, chunksize=4), desc, total=len(jobs), unit="img"))


# ---------------------------------------------------------------------------------------------------------------
# Text: questions, answers, captions and conversations from the ground truth
# ---------------------------------------------------------------------------------------------------------------

CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of this image.",
    "Summarise what this image shows in one sentence.",
    "Write a brief caption for this image.",
    "What does this image show? Answer briefly.",
    "Provide a concise description of the image.",
    "Briefly describe the findings in this image.",
    "Caption this medical image.",
)
NOUNS = ("lesion", "focal lesion", "nodule")


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def contrast_word(inst: dict, rnd: random.Random) -> str:
    terms = CONTRAST_TERMS.get(inst["modality"])
    generic = "bright" if inst["contrast"] == "bright" else "dark"
    if terms and rnd.random() < 0.5:
        return terms[0] if inst["contrast"] == "bright" else terms[1]
    return generic


def finding_phrase(inst: dict, rnd: random.Random) -> str:
    """'two small hypodense lesions in the upper left of the image'."""
    n = inst["count"]
    noun = _plural(rnd.choice(NOUNS), n)
    where = rnd.choice(("in the {q} of the image", "in the {q} part of the image", "in the {q} quadrant"))
    return (
        f"{COUNT_WORDS[n]} {inst['size']} {contrast_word(inst, rnd)} {noun} {where.format(q=quadrant(inst))}"
    )


def quadrant(inst: dict) -> str:
    return f"{inst['position']} {inst['side']}"


def study_phrase(inst: dict) -> str:
    return f"{MODALITY_PHRASE[inst['modality']]} of {REGION_PHRASE[inst['region']]}"


def caption(inst: dict, rnd: random.Random) -> str:
    study = study_phrase(inst)
    if inst["count"] == 0:
        return rnd.choice(
            (
                f"{_cap(study)} with no focal lesion.",
                f"{_cap(study)}. No focal lesion is seen.",
                f"{_cap(study)}; no lesion is visible.",
                f"{_cap(study)} without any focal abnormality.",
            )
        )
    finding = finding_phrase(inst, rnd)
    return rnd.choice(
        (
            f"{_cap(study)} showing {finding}.",
            f"{_cap(study)} with {finding}.",
            f"{_cap(study)}. There {'is' if inst['count'] == 1 else 'are'} {finding}.",
            f"{_cap(study)}: {finding}.",
        )
    )


# --- VQA candidates: each returns (question_type, answer_type, question, answer, asked) -----------------------------


def _lesion_ref(inst: dict, rnd: random.Random) -> tuple[str, str]:
    """('the lesion', 'is') or ('the lesions', 'are'), with a random synonym."""
    noun = rnd.choice(NOUNS)
    return (f"the {noun}", "is") if inst["count"] == 1 else (f"the {noun}s", "are")


def q_modality_open(inst, rnd, _vocab):
    q = rnd.choice(
        (
            "What imaging modality is this?",
            "Which modality was used to acquire this image?",
            "What kind of image is this?",
            "What type of imaging is shown?",
            "How was this image acquired?",
        )
    )
    return [("MODALITY", "OPEN", q, inst["modality"].lower(), None)]


def q_modality_closed(inst, rnd, vocab):
    out = []
    for asked in (inst["modality"], _other(inst["modality"], vocab["modality"], rnd)):
        phrase = rnd.choice(MODALITY_ASKED[asked])
        q = rnd.choice(("Is this {a}?", "Is the image {a}?", "Would you call this {a}?")).format(a=phrase)
        out.append(("MODALITY", "CLOSED", q, "yes" if asked == inst["modality"] else "no", asked))
    return out


def q_organ_open(inst, rnd, _vocab):
    q = rnd.choice(
        (
            "Which body region is shown?",
            "What part of the body is imaged?",
            "What organ or region does this show?",
            "Which anatomical region is this?",
            "What body part is in this image?",
        )
    )
    return [("ORGAN", "OPEN", q, inst["region"], None)]


def q_organ_closed(inst, rnd, vocab):
    out = []
    for asked in (inst["region"], _other(inst["region"], vocab["region"], rnd)):
        phrase = REGION_PHRASE[asked]
        q = rnd.choice(("Does this image show {r}?", "Is this an image of {r}?", "Is {r} the region shown?"))
        out.append(("ORGAN", "CLOSED", q.format(r=phrase), "yes" if asked == inst["region"] else "no", asked))
    return out


def q_presence(inst, rnd, _vocab):
    q = rnd.choice(
        (
            "Is there a lesion in this image?",
            "Is any focal lesion visible?",
            "Can you see a nodule?",
            "Are there any lesions?",
            "Is a focal lesion present?",
            "Does this image contain a lesion?",
        )
    )
    return [("PRES", "CLOSED", q, "yes" if inst["count"] else "no", None)]


def q_count_open(inst, rnd, _vocab):
    q = rnd.choice(
        (
            "How many lesions are there?",
            "How many focal lesions can be seen?",
            "What is the number of lesions in this image?",
            "How many nodules are visible?",
        )
    )
    return [("COUNT", "OPEN", q, str(inst["count"]), None)]


def q_count_closed(inst, rnd, _vocab):
    n = inst["count"]
    out = [("COUNT", "CLOSED", "Is there more than one lesion?", "yes" if n > 1 else "no", ">1")]
    asked = rnd.choice([k for k in (1, 2, 3) if k != n]) if rnd.random() < 0.5 or n == 0 else n
    word = COUNT_WORDS[asked]
    q = f"Is there exactly {word} lesion?" if asked == 1 else f"Are there exactly {word} lesions?"
    out.append(("COUNT", "CLOSED", q, "yes" if asked == n else "no", str(asked)))
    return out


def q_position_open(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    return [
        (
            "POS",
            "OPEN",
            rnd.choice(
                (
                    f"On which side of the image {be} {ref}?",
                    f"Is {ref} on the left or the right side of the image?",
                )
            ),
            inst["side"],
            "side",
        ),
        (
            "POS",
            "OPEN",
            rnd.choice(
                (
                    f"{_cap(be)} {ref} in the upper or the lower part of the image?",
                    f"In which half of the image, upper or lower, {be} {ref}?",
                )
            ),
            inst["position"],
            "position",
        ),
        (
            "POS",
            "OPEN",
            rnd.choice((f"In which quadrant of the image {be} {ref}?", f"Where in the image {be} {ref}?")),
            quadrant(inst),
            "quadrant",
        ),
    ]


def q_position_closed(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    out = []
    for asked in ("left", "right"):
        q = rnd.choice(
            (f"{_cap(be)} {ref} on the {asked} side of the image?", f"{_cap(be)} {ref} in the {asked} half?")
        )
        out.append(("POS", "CLOSED", q, "yes" if inst["side"] == asked else "no", asked))
    for asked in ("upper", "lower"):
        q = rnd.choice(
            (f"{_cap(be)} {ref} in the {asked} half of the image?", f"{_cap(be)} {ref} in the {asked} part?")
        )
        out.append(("POS", "CLOSED", q, "yes" if inst["position"] == asked else "no", asked))
    return out


def q_size_open(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    q = rnd.choice((f"{_cap(be)} {ref} small or large?", f"What is the size of {ref}, small or large?"))
    return [("SIZE", "OPEN", q, inst["size"], None)]


def q_size_closed(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    return [
        ("SIZE", "CLOSED", f"{_cap(be)} {ref} {asked}?", "yes" if inst["size"] == asked else "no", asked)
        for asked in ("small", "large")
    ]


def q_contrast_open(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    q = rnd.choice(
        (
            f"{_cap(be)} {ref} brighter or darker than the surrounding tissue?",
            f"Compared with its surroundings, {be} {ref} brighter or darker?",
        )
    )
    return [("ATTRIB", "OPEN", q, "brighter" if inst["contrast"] == "bright" else "darker", None)]


def q_contrast_closed(inst, rnd, _vocab):
    ref, be = _lesion_ref(inst, rnd)
    out = []
    for asked in ("brighter", "darker"):
        q = rnd.choice(
            (
                f"{_cap(be)} {ref} {asked} than the surrounding tissue?",
                f"Does {ref} look {asked} than its surroundings?",
            )
        )
        truth = "brighter" if inst["contrast"] == "bright" else "darker"
        out.append(("ATTRIB", "CLOSED", q, "yes" if truth == asked else "no", asked))
    return out


def _other(value: str, pool: Sequence[str], rnd: random.Random) -> str:
    """A value different from `value`, drawn from `pool` (the split's observed values, with their frequencies,
    so that 'no' questions ask about each value about as often as 'yes' questions do)."""
    others = [v for v in pool if v != value]
    return rnd.choice(others) if others else value


# (generator, needs a lesion, share of the VQA rows)
VQA_QUESTIONS = (
    (q_modality_open, False, 0.08),
    (q_organ_open, False, 0.08),
    (q_count_open, False, 0.08),
    (q_position_open, True, 0.10),
    (q_size_open, True, 0.05),
    (q_contrast_open, True, 0.05),
    (q_modality_closed, False, 0.08),
    (q_organ_closed, False, 0.08),
    (q_presence, False, 0.12),
    (q_count_closed, False, 0.08),
    (q_position_closed, True, 0.10),
    (q_size_closed, True, 0.05),
    (q_contrast_closed, True, 0.05),
)
# The held-out test split asks more modality questions (~26% of its rows instead of 16%), so that each of the 7
# modalities gets >= 20 of them and the per-modality accuracy means something.
TEST_SHARES = {q_modality_open: 0.15, q_modality_closed: 0.15}


def vqa_table(split: str) -> tuple:
    """VQA_QUESTIONS with the split's shares."""
    if split != "test":
        return VQA_QUESTIONS
    return tuple((gen, needs, TEST_SHARES.get(gen, share)) for gen, needs, share in VQA_QUESTIONS)


def vqa_candidates(instances: Sequence[dict], generator, needs_lesion: bool, vocab, rnd) -> list[dict]:
    out = []
    for inst in instances:
        if needs_lesion and not inst["count"]:
            continue
        for qtype, atype, question, answer, asked in generator(inst, rnd, vocab):
            out.append(
                dict(
                    instance=inst,
                    question_type=qtype,
                    answer_type=atype,
                    question=question,
                    answer=answer,
                    asked=asked,
                )
            )
    return out


def _modality(candidate: dict) -> str:
    return candidate["instance"]["modality"]


def balanced_pick(
    candidates: list[dict], n: int, rnd: random.Random, key=lambda c: c["answer"], spread=_modality
) -> list[dict]:
    """n candidates, answers as even as possible (round robin over answer groups), at most one per instance
    while unused instances remain, and within an answer the `spread` values (modalities) as even as possible."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        groups[key(c)].append(c)
    for g in groups.values():
        rnd.shuffle(g)
    picked, used, spread_count = [], set(), Counter()
    answers = sorted(groups)
    while len(picked) < n and any(groups.values()):
        order = answers[:]
        rnd.shuffle(order)
        for answer in order:
            group = groups[answer]
            if not group or len(picked) >= n:
                continue
            i = min(
                range(len(group)),
                key=lambda k: (group[k]["instance"]["id"] in used, spread_count[answer, spread(group[k])]),
            )
            choice = group.pop(i)
            used.add(choice["instance"]["id"])
            spread_count[answer, spread(choice)] += 1
            picked.append(choice)
    return picked


def quotas(n: int, shares: Sequence[float]) -> list[int]:
    """Integers proportional to `shares` summing to n (largest remainders)."""
    exact = [n * s / sum(shares) for s in shares]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: out[i] - exact[i])[: n - sum(out)]:
        out[i] += 1
    return out


def select_vqa(instances: Sequence[dict], n: int, rnd: random.Random, table=VQA_QUESTIONS) -> list[dict]:
    """n questions in the table's shares, answers balanced within each question kind; a kind short of
    candidates (few images with lesions in a small build) leaves its rows to the others."""
    vocab = {k: [inst[k] for inst in instances] for k in ("modality", "region")}
    pools = [vqa_candidates(instances, gen, needs_lesion, vocab, rnd) for gen, needs_lesion, _ in table]
    picked = []
    for pool, quota in zip(pools, quotas(n, [share for *_, share in table]), strict=True):
        chosen = balanced_pick(pool, quota, rnd)
        taken = {id(c) for c in chosen}
        pool[:] = [c for c in pool if id(c) not in taken]
        picked += chosen
    for pool in pools:  # top up from what is left, kind by kind
        if len(picked) >= n:
            break
        picked += balanced_pick(pool, n - len(picked), rnd)
    rnd.shuffle(picked)
    return picked[:n]


# --- CHOICE questions (GRPO) -----------------------------------------------------------------------------------------

LETTERS = "ABCD"


def choice_question(inst: dict, kind: str, rnd: random.Random, vocab) -> dict | None:
    if kind == "MODALITY":
        question, truth, pool = (
            "Which imaging modality was used?",
            inst["modality"].lower(),
            [m.lower() for m in MODALITIES],
        )
    elif kind == "ORGAN":
        question, truth, pool = "Which body region is shown?", inst["region"], sorted(REGION_PHRASE)
    elif kind == "COUNT":
        question, truth, pool = "How many lesions are visible?", str(inst["count"]), ["0", "1", "2", "3"]
    else:
        if not inst["count"]:
            return None
        ref, be = _lesion_ref(inst, rnd)
        question, truth, pool = f"In which quadrant of the image {be} {ref}?", quadrant(inst), list(QUADRANTS)
    distractors = rnd.sample([p for p in pool if p != truth], 3)
    slot = rnd.randrange(4)
    options = distractors[:slot] + [truth] + distractors[slot:]
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))
    text = f"{question}\n{lines}\nAnswer with the letter of the correct option."
    return dict(
        instance=inst,
        question_type="POS" if kind == "QUADRANT" else kind,
        answer_type="CHOICE",
        question=text,
        answer=LETTERS[slot],
        asked=truth,
    )


def select_grpo(instances: Sequence[dict], n: int, rnd: random.Random) -> list[dict]:
    """40% lettered CHOICE (modality, region, count, quadrant), 60% yes/no and short-answer questions."""
    vocab = {k: [inst[k] for inst in instances] for k in ("modality", "region")}
    picked = []
    n_choice = round(0.4 * n)
    for i, kind in enumerate(("MODALITY", "ORGAN", "COUNT", "QUADRANT")):
        quota = n_choice // 4 + (i < n_choice % 4)
        candidates = [c for inst in instances if (c := choice_question(inst, kind, rnd, vocab))]
        picked += balanced_pick(candidates, quota, rnd)
    picked += select_vqa(instances, n - len(picked), rnd)
    rnd.shuffle(picked)
    return picked[:n]


# --- stage-2 conversations -------------------------------------------------------------------------------------------


def turn_overview(inst, rnd):
    q = rnd.choice(
        (
            "What type of image is this, and what does it show?",
            "What am I looking at here?",
            "Can you tell me what kind of scan this is?",
            "Which imaging modality and body region is this?",
        )
    )
    return q, f"This is {study_phrase(inst)}."


def turn_findings(inst, rnd):
    q = rnd.choice(
        (
            "Do you see any abnormality?",
            "Is there anything abnormal in this image?",
            "Are there any focal lesions?",
            "What are the findings?",
            "Is anything unusual visible?",
        )
    )
    if not inst["count"]:
        return q, rnd.choice(
            (
                "No. I do not see any focal lesion in this image.",
                "No focal lesion is visible; the tissue looks uniform apart from normal structures.",
            )
        )
    be = "is" if inst["count"] == 1 else "are"
    return q, f"Yes. There {be} {finding_phrase(inst, rnd)}."


def turn_count(inst, rnd):
    q = rnd.choice(
        (
            "How many lesions can you see?",
            "How many lesions are there in total?",
            "Can you count the lesions?",
        )
    )
    n = inst["count"]
    if n == 0:
        return q, "None. There are no lesions in this image."
    return q, "There is one lesion." if n == 1 else f"There are {COUNT_WORDS[n]} lesions."


def turn_location(inst, rnd):
    ref, be = _lesion_ref(inst, rnd)
    q = rnd.choice(
        (
            f"Where exactly {be} {ref}?",
            f"Which part of the image {be} {ref} in?",
            f"Can you describe where {ref} {be}?",
        )
    )
    pronoun = "It is" if inst["count"] == 1 else "They are"
    return (
        q,
        f"{pronoun} in the {inst['position']} half of the image, on the {inst['side']} side of the image.",
    )


def turn_size(inst, rnd):
    ref, be = _lesion_ref(inst, rnd)
    q = rnd.choice((f"How big {be} {ref}?", f"{_cap(be)} {ref} large or small?"))
    pronoun = "It is" if inst["count"] == 1 else "They are"
    detail = (
        "a small fraction of the field of view"
        if inst["size"] == "small"
        else "a sizeable part of the quadrant"
    )
    return q, f"{pronoun} {inst['size']}, covering {detail}."


def turn_contrast(inst, rnd):
    ref, be = _lesion_ref(inst, rnd)
    q = rnd.choice(
        (
            f"How {'does' if be == 'is' else 'do'} {ref} compare in brightness with the tissue around "
            f"{'it' if be == 'is' else 'them'}?",
            f"{_cap(be)} {ref} brighter or darker than the surroundings?",
        )
    )
    pronoun = "It is" if inst["count"] == 1 else "They are"
    relation = "brighter" if inst["contrast"] == "bright" else "darker"
    terms = CONTRAST_TERMS.get(inst["modality"])
    term = f" ({terms[0] if inst['contrast'] == 'bright' else terms[1]})" if terms else ""
    return q, f"{pronoun} {relation} than the surrounding tissue{term}."


def turn_region(inst, rnd):
    q = rnd.choice(("Which part of the body is this?", "What anatomy is shown?"))
    return q, f"The image shows {REGION_PHRASE[inst['region']]}."


def dialogue(inst: dict, rnd: random.Random) -> list[tuple[str, str]]:
    """2-4 turns: an opening (overview or findings), then follow-ups that fit the ground truth."""
    opening = rnd.choice((turn_overview, turn_findings))
    follow = [turn_findings if opening is turn_overview else turn_overview, turn_count]
    if inst["count"]:
        follow += [turn_location, turn_size, turn_contrast]
    if opening is turn_findings:
        follow.append(turn_region)
    rnd.shuffle(follow)
    if turn_findings in follow and inst["count"]:  # lesion follow-ups only after the lesions were mentioned
        follow.remove(turn_findings)
        follow.insert(0, turn_findings)
    turns = [opening] + follow[: rnd.randint(1, 3)]
    return [t(inst, rnd) for t in turns]


# ---------------------------------------------------------------------------------------------------------------
# Rows in the project schema
# ---------------------------------------------------------------------------------------------------------------


def _meta(inst: dict) -> dict:
    return {
        "modality": inst["modality"],
        "region": inst["region"],
        "source": SOURCE_NAME,
        "instance": inst["id"],
    }


def caption_rows(instances, n, split, rnd) -> list[dict]:
    rows = []
    for i in range(n):
        inst = instances[i % len(instances)]
        messages = conversation([(rnd.choice(CAPTION_INSTRUCTIONS), caption(inst, rnd))])
        rows.append(
            {
                "id": f"{SOURCE_NAME}-cap-{split}-{i:05d}",
                "images": [inst["image"]],
                "messages": messages,
                **_meta(inst),
            }
        )
    return rows


def instruct_rows(instances, n, split, rnd) -> list[dict]:
    offset = (
        len(instances) // 2
    )  # start half-way so the first images are not all captioned and discussed alike
    rows = []
    for i in range(n):
        inst = instances[(i + offset) % len(instances)]
        rows.append(
            {
                "id": f"{SOURCE_NAME}-ins-{split}-{i:05d}",
                "images": [inst["image"]],
                "messages": conversation(dialogue(inst, rnd)),
                **_meta(inst),
            }
        )
    return rows


def vqa_rows(picked, split) -> list[dict]:
    return [
        make_vqa_row(
            f"{SOURCE_NAME}-vqa-{split}-{i:05d}",
            [c["instance"]["image"]],
            c["question"],
            c["answer"],
            c["answer_type"],
            question_type=c["question_type"],
            **_meta(c["instance"]),
        )
        for i, c in enumerate(picked)
    ]


def grpo_rows(picked, split) -> list[dict]:
    return [
        {
            "id": f"{SOURCE_NAME}-grpo-{split}-{i:05d}",
            "images": [c["instance"]["image"]],
            "prompt": [message("user", c["question"], 1)],
            "solution": c["answer"],
            "answer_type": c["answer_type"],
            "question_type": c["question_type"],
            **_meta(c["instance"]),
        }
        for i, c in enumerate(picked)
    ]


# ---------------------------------------------------------------------------------------------------------------
# README: the counts this build produced
# ---------------------------------------------------------------------------------------------------------------


def text_only_baseline(train: Sequence[dict], test: Sequence[dict]) -> dict[str, float]:
    """Accuracy of answering test VQA from the question text alone (the train majority answer of the same
    question, else of the same question type and answer type): how guessable the set is without the image."""
    from medllava.schema import vqa_answer, vqa_question

    by_question, by_type = defaultdict(Counter), defaultdict(Counter)
    for row in train:
        by_question[normalise_text(vqa_question(row))][vqa_answer(row)] += 1
        by_type[(row["question_type"], row["answer_type"])][vqa_answer(row)] += 1
    hits = Counter()
    for row in test:
        votes = by_question.get(normalise_text(vqa_question(row))) or by_type.get(
            (row["question_type"], row["answer_type"]), Counter({"": 1})
        )
        hits[row["answer_type"], "n"] += 1
        hits[row["answer_type"], "hit"] += votes.most_common(1)[0][0] == vqa_answer(row)
    return {t: hits[t, "hit"] / hits[t, "n"] for t in ("CLOSED", "OPEN") if hits[t, "n"]}


def readme(args, rows: dict, instances: dict, units: Sequence[Unit], notes: Sequence[str]) -> str:
    from medllava.schema import vqa_answer

    lines = [
        "# medsynth: a synthetic-finding medical VQA starter set on real images",
        "",
        f"Built by `python -m data_pipelines.medsynth --out DIR --seed {args.seed} --size {args.size} "
        f"--image-size {args.image_size}`; the same command rebuilds these files byte for byte.",
        "",
        "Backgrounds are real images shipped by pydicom, pydicom-data, nibabel, nilearn and scikit-image; the "
        "lesions are synthetic and are the only findings labelled. Some backgrounds carry real, unlabelled "
        "abnormality (the 693 head CT shows subdural collections). Left/right always means the left/right of the "
        "IMAGE as displayed (the viewer's left), not the patient's side. `instances_<split>.jsonl` holds the "
        "ground truth of every image (source slice and area; augmentation: crop, flips, intensity jitter; each "
        "lesion's centre and radii in pixels). A background unit (a slice or frame of a file, or a region of its "
        "picture) belongs to one split; regions of one file do not overlap and are separated by a gap.",
        "",
        "## Rows per split",
        "",
    ]
    lines.append(rows_table(rows, instances))
    lines += ["", "## Images per modality and split (background units in brackets)", ""]
    unit_count = Counter((u.split, u.modality) for u in units)
    modalities = sorted({inst["modality"] for s in SPLITS for inst in instances[s]})
    lines.append(
        format_table(
            ["modality", *SPLITS],
            [
                [
                    m,
                    *(
                        f"{sum(i['modality'] == m for i in instances[s])} ({unit_count[s, m]})"
                        for s in SPLITS
                    ),
                ]
                for m in modalities
            ],
        )
    )
    lines += ["", "## Background sources", ""]
    per_source = Counter((u.source, u.split) for u in units)
    lines.append(
        format_table(
            ["source", "file", "modality", "region", *(f"{s} units" for s in SPLITS)],
            [
                [
                    s.key,
                    f"{s.package}: {s.relpath}",
                    units_of(units, s.key)[0].modality,
                    units_of(units, s.key)[0].region,
                    *(per_source[s.key, sp] for sp in SPLITS),
                ]
                for s in SOURCES
                if units_of(units, s.key)
            ],
        )
    )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    lines += ["", "## Lesions per image", ""]
    lines.append(
        format_table(
            ["lesions", *SPLITS],
            [[n, *(sum(i["count"] == n for i in instances[s]) for s in SPLITS)] for n in range(4)],
        )
    )
    lines += ["", "## VQA rows per question type and answer type", ""]
    qtypes = sorted({r["question_type"] for s in SPLITS for r in rows["vqa"][s]})
    lines.append(
        format_table(
            ["question_type", *(f"{s} {t}" for s in SPLITS for t in ("OPEN", "CLOSED"))],
            [
                [
                    q,
                    *(
                        sum(r["question_type"] == q and r["answer_type"] == t for r in rows["vqa"][s])
                        for s in SPLITS
                        for t in ("OPEN", "CLOSED")
                    ),
                ]
                for q in qtypes
            ],
        )
    )
    lines += ["", "## MODALITY questions per modality (OPEN + CLOSED)", ""]
    lines.append(
        format_table(
            ["modality", *SPLITS],
            [
                [
                    m,
                    *(
                        sum(r["question_type"] == "MODALITY" and r["modality"] == m for r in rows["vqa"][s])
                        for s in SPLITS
                    ),
                ]
                for m in modalities
            ],
        )
    )
    lines += ["", "## CLOSED answers (yes / no) per question type", ""]
    lines.append(
        format_table(
            ["question_type", *SPLITS],
            [
                [
                    q,
                    *(
                        "{} / {}".format(
                            *(
                                sum(
                                    r["question_type"] == q
                                    and r["answer_type"] == "CLOSED"
                                    and vqa_answer(r) == a
                                    for r in rows["vqa"][s]
                                )
                                for a in ("yes", "no")
                            )
                        )
                        for s in SPLITS
                    ),
                ]
                for q in qtypes
            ],
        )
    )
    lines += ["", "## OPEN answers (train / val / test)", ""]
    open_answers = defaultdict(Counter)
    for s in SPLITS:
        for r in rows["vqa"][s]:
            if r["answer_type"] == "OPEN":
                open_answers[r["question_type"], vqa_answer(r)][s] += 1
    lines.append(
        format_table(
            ["question_type", "answer", *SPLITS],
            [[q, a, *(open_answers[q, a][s] for s in SPLITS)] for q, a in sorted(open_answers)],
        )
    )
    lines += ["", "## GRPO rows per answer type (CHOICE letters in brackets)", ""]
    lines.append(
        format_table(
            ["split", "OPEN", "CLOSED", "CHOICE"],
            [
                [
                    s,
                    *(sum(r["answer_type"] == t for r in rows["grpo"][s]) for t in ("OPEN", "CLOSED")),
                    "{} ({})".format(
                        sum(r["answer_type"] == "CHOICE" for r in rows["grpo"][s]),
                        " ".join(
                            f"{k}:{v}"
                            for k, v in sorted(
                                Counter(
                                    r["solution"] for r in rows["grpo"][s] if r["answer_type"] == "CHOICE"
                                ).items()
                            )
                        ),
                    ),
                ]
                for s in SPLITS
            ],
        )
    )
    baseline = text_only_baseline(rows["vqa"]["train"], rows["vqa"]["test"])
    lines += [
        "",
        "## Question text alone (no image)",
        "",
        "Test VQA accuracy of answering with the most frequent train answer of the same question text: "
        + ", ".join(f"{t} {v:.1%}" for t, v in baseline.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def rows_table(rows: dict, instances: dict) -> str:
    return format_table(
        ["file", *SPLITS],
        [[f"{stage}_<split>.jsonl", *(len(rows[stage][s]) for s in SPLITS)] for stage in STAGES]
        + [["images", *(len(instances[s]) for s in SPLITS)]],
    )


def units_of(units: Sequence[Unit], key: str) -> list[Unit]:
    return [u for u in units if u.source == key]


# ---------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------


def scaled(value: int, size: float, minimum: int) -> int:
    return max(minimum, round(value * size))


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier build unless --overwrite; then remove only what this tool writes."""
    ours = [
        out / "images",
        out / "README.md",
        *(out / f"{s}_{p}.jsonl" for s in (*STAGES, "instances") for p in SPLITS),
    ]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {out} already holds a medsynth build ({existing[0].name}); pass --overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def build(args) -> dict:
    """Everything: catalogue, backgrounds, images, rows, README. Returns the rows per stage and split."""
    t0 = time.perf_counter()
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    units, files, notes = catalogue()
    for note in notes:
        print(f"note: {note}")
    specs = [
        spec
        for split in SPLITS
        for spec in sample_specs(units, split, scaled(DEFAULT_INSTANCES[split], args.size, 8), args.seed)
    ]
    used = [
        u for u in units if u.key in {spec.unit for spec in specs}
    ]  # a small build loads only what it uses
    jobs = [(u, str(files[u.source])) for u in used]
    arrays = _pool_map(load_background, jobs, args.num_workers, "loading backgrounds")
    library = {u.key: a for u, a in zip(used, arrays, strict=True)}
    print(
        f"{len(used)} of {len(units)} background units loaded from {len(files)} files "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    labels = {key: f"{SOURCE_BY_KEY[key].package}/{SOURCE_BY_KEY[key].relpath}" for key in files}
    render_jobs = [(spec, str(out), args.image_size, labels[spec.source]) for spec in specs]
    rendered = _pool_map(_render_job, render_jobs, args.num_workers, "rendering images", initargs=(library,))
    instances = {split: [r for r in rendered if r["split"] == split] for split in SPLITS}

    rows = {stage: {} for stage in STAGES}
    for split in SPLITS:
        insts = instances[split]
        n = {stage: scaled(DEFAULT_ROWS[stage][split], args.size, 4) for stage in STAGES}
        rnd = lambda stage, s=split: random.Random(f"{args.seed}/{s}/{stage}")  # noqa: E731 - one stream per file
        rows["captions"][split] = caption_rows(insts, n["captions"], split, rnd("captions"))
        rows["instruct"][split] = instruct_rows(insts, n["instruct"], split, rnd("instruct"))
        rows["vqa"][split] = vqa_rows(select_vqa(insts, n["vqa"], rnd("vqa"), vqa_table(split)), split)
        rows["grpo"][split] = grpo_rows(select_grpo(insts, n["grpo"], rnd("grpo")), split)
        write_jsonl(out / f"instances_{split}.jsonl", insts)
        for stage in STAGES:
            write_jsonl(out / f"{stage}_{split}.jsonl", rows[stage][split])
            if len(rows[stage][split]) < n[stage]:  # too few images with lesions for the question mix
                note = f"{stage}_{split}: {len(rows[stage][split])} rows, {n[stage]} requested"
                notes.append(note)
                print(f"note: {note}")
    text = readme(args, rows, instances, units, notes)
    (out / "README.md").write_text(text, encoding="utf-8")
    print(rows_table(rows, instances))
    print(
        f"wrote {out} ({sum(len(v) for v in instances.values())} images) in {time.perf_counter() - t0:.1f} s"
    )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    parser.add_argument(
        "--size",
        type=float,
        default=1.0,
        help="multiplier on the default counts (1.0: ~1,940 images, 12,000 train VQA rows)",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="side of the saved square PNGs (default 224)"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="processes for loading and rendering")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    args = parser.parse_args(argv)
    if args.size <= 0:
        parser.error("--size must be > 0")
    if args.image_size < 112:
        parser.error("--image-size must be at least 112 (findings are sized for a 112 px model input)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
