"""CT and MRI volumes (a NIfTI file or a DICOM series) as a bounded set of rendered slices with their positions.

Usage:
    python -m medllava.volumes chest_ct/ --n-slices 8 --axis axial --out slices/   # PNGs + metadata JSON

    from medllava.volumes import load_volume, volume_slices

    shown = volume_slices("chest_ct/", n_slices=8)      # a folder, a .zip, a .nii/.nii.gz, or a list of DICOM files
    shown.images          # 8 RGB PIL images; for CT the R, G, B channels are the lung, soft-tissue and bone windows
    shown.prompt_text     # "Slices (axial, inferior to superior, mm from the first): 0, 40, 80, ..."
    shown.metadata()      # JSON-safe: indices, positions, spacing, modality, channels, gaps (no patient data)

    volume = load_volume("head.nii.gz")                 # geometry from the headers only; pixels read on demand
    volume.n_slices("coronal")                          # e.g. 233
    volume.slices(indices=[120], axis="coronal", windows=("bone",))   # one slice, one window (a slice scroller)

A DICOM series is sorted by the position of each slice along the slice normal (ImagePositionPatient projected on
the cross product of the ImageOrientationPatient cosines), never by file name or InstanceNumber. Whatever could
make the volume silently wrong is refused with a `VolumeError` naming the file and the reason: several series
mixed (pick one with `series_uid=`), missing slices (a step over 1.5x the median spacing; `allow_gaps=True` accepts
them and reports each gap), gantry tilt or a sheared stack, irregular or duplicate slice positions, and slices that
disagree on orientation, pixel spacing or size. Every size limit (`VolumeLimits`) is checked from the headers
before any pixel data is decompressed or read (DICOM headers are read with `stop_before_pixels=True`, a `.nii.gz`
through gzip for its first 540 bytes only); over one, `VolumeTooLargeError`.

Rendering: CT values are Hounsfield units (RescaleSlope/RescaleIntercept, or the NIfTI scaling); each requested
window (level, width) becomes one channel, three windows make an RGB image and one window a gray one. Other
modalities are scaled between the 1st and 99th percentile of the whole volume (estimated on up to 8 slices spread
through it) and replicated to gray RGB, so all slices of one volume share one scale. Images are shown in the
radiological convention (axial: anterior up, patient's right on the image's left; coronal: superior up, right on
the left; sagittal: superior up, anterior on the left) with square pixels, at most `max_side` pixels on a side.

Nothing here logs, and no DICOM header value that could identify a patient is read into an error or the metadata:
only technical tags (`SAFE_TAGS`) and the SeriesInstanceUIDs needed to choose a series.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medllava.processing import ImageLoadError, ImageTooLargeError

DEFAULT_SAMPLED_SLICES = 8
# Technical DICOM tags copied into the metadata; nothing that identifies a patient, a date or an institution.
SAFE_TAGS = ("Modality", "BodyPartExamined", "SeriesDescription", "SliceThickness", "ConvolutionKernel")
# (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_WINDOWS = ("lung", "soft_tissue", "bone")
PERCENTILES = (1.0, 99.0)
AXES = ("axial", "coronal", "sagittal")
# For each plane: the world (LPS) axis of its normal, the (world axis, sign) that image rows and columns run
# along, and the order in which slices are listed (increasing world coordinate along the normal).
_PLANES = {
    "axial": (2, (1, 1), (0, 1), "inferior to superior"),
    "coronal": (1, (2, -1), (0, 1), "anterior to posterior"),
    "sagittal": (0, (2, -1), (1, 1), "right to left"),
}
_GAP_FACTOR = 1.5  # a step between slices over this many times the median spacing means slices are missing
_SPACING_TOLERANCE = 0.1  # a step off the median by more than this fraction (and 0.01 mm) is irregular
_MAX_TILT_DEG = 0.5
_REFERENCE_SLICES = 8  # slices read to estimate an MRI's percentiles or tell CT from MRI in a NIfTI file


class VolumeError(ImageLoadError):
    """A volume could not be loaded or would be wrong; the message names the file and the reason."""


class VolumeTooLargeError(VolumeError, ImageTooLargeError):
    """A volume is over a limit on files, slices, voxels or bytes (checked from the headers)."""


class VolumeGeometryError(VolumeError):
    """The slices do not form one regular volume: gaps, tilt, irregular spacing, inconsistent orientation."""


class MixedSeriesError(VolumeError):
    """Several DICOM series were given; `series` lists them (uid, files, modality, description)."""

    def __init__(self, message: str, series: list[dict[str, Any]]):
        super().__init__(message)
        self.series = series


@dataclass(frozen=True)
class VolumeLimits:
    """Bounds on one volume, all checked from headers before pixel data is read."""

    max_files: int = 2048  # files looked at in a folder, zip or list (other series and non-DICOM files count)
    max_slices: int = (
        1024  # slices in the volume (DICOM files of the series; NIfTI slices along its third axis)
    )
    max_bytes: int = 512 * 1024 * 1024  # stored bytes: the files, or a zip, as given
    max_decoded_bytes: int = 1024 * 1024 * 1024  # pixel data the headers declare, once decompressed
    max_voxels: int = 512 * 512 * 1024
    max_slice_pixels: int = 4096 * 4096
    max_sampled: int = 16  # slices rendered in one call

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VolumeLimits.{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The result types
# ---------------------------------------------------------------------------------------------------------------


def _mm(x: float) -> str:
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


@dataclass
class VolumeSlices:
    """Rendered slices of a volume along one axis and where they are."""

    images: list[Image.Image]
    axis: str  # "axial", "coronal" or "sagittal"
    direction: str  # the order of the slices, e.g. "inferior to superior"
    indices: list[int]  # slice numbers along the axis, 0 = the first slice in `direction`
    positions_mm: list[float]  # distance of each shown slice from the first shown one, along the axis
    n_total: int  # slices along the axis in the volume
    spacing_mm: float  # median distance between neighbouring slices along the axis
    pixel_spacing_mm: tuple[float, float]  # (rows, columns) of the shown images
    modality: str
    channels: list[str]  # what the R, G, B channels show (one entry when gray)
    gaps: list[dict[str, float]] = field(default_factory=list)  # missing slices (only with allow_gaps=True)

    @property
    def prompt_text(self) -> str:
        """One line for the prompt, e.g. "Slices (axial, inferior to superior, mm from the first): 0, 12.5, 25"."""
        positions = ", ".join(_mm(p) for p in self.positions_mm)
        return f"Slices ({self.axis}, {self.direction}, mm from the first): {positions}"

    def metadata(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "direction": self.direction,
            "indices": list(self.indices),
            "positions_mm": list(self.positions_mm),
            "n_total": self.n_total,
            "spacing_mm": self.spacing_mm,
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "modality": self.modality,
            "channels": list(self.channels),
            "gaps": [dict(g) for g in self.gaps],
            "prompt_text": self.prompt_text,
        }


Reader = Callable[[int, Sequence[int]], list[np.ndarray]]


class Volume:
    """A validated volume: geometry from the headers; pixels read on demand through `reader`.

    Array axes: 0 = image rows, 1 = image columns, 2 = the stack (DICOM files sorted by position, or the NIfTI third
    axis). `directions[a]` is the unit vector (patient LPS coordinates) along which array axis `a` increases,
    `spacing[a]` its spacing in mm (median for a DICOM stack), `positions` the location of each stack slice in mm
    along `directions[2]`. `reader(a, ks)` returns the planes perpendicular to array axis `a` at indices `ks`, as
    float32 arrays (Hounsfield units for CT) whose axes are the other two array axes in increasing order.
    """

    def __init__(
        self,
        *,
        source: str,
        name: str,
        shape: tuple[int, int, int],
        directions: np.ndarray,
        spacing: tuple[float, float, float],
        positions: np.ndarray,
        reader: Reader,
        modality: str | None,
        modality_source: str,
        limits: VolumeLimits,
        gaps: list[dict[str, float]] | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.source, self.name, self.shape = source, name, tuple(int(n) for n in shape)
        self.directions = np.asarray(directions, dtype=np.float64)
        # NIfTI stores spacing as float32 (0.8 -> 0.80000001): rounded so that formats agree on image sizes.
        self.spacing = tuple(round(float(s), 5) for s in spacing)
        self.positions = np.asarray(positions, dtype=np.float64)
        self._reader, self.limits = reader, limits
        self.gaps, self.info = list(gaps or []), dict(info or {})
        self._world = _world_axes(self.directions, name)
        self.obliquity_deg = float(
            max(math.degrees(math.acos(min(1.0, abs(self.directions[a, self._world[a]])))) for a in range(3))
        )
        self._lock = threading.Lock()
        self._reference: np.ndarray | None = None
        self._range: tuple[float, float] | None = None
        if modality is None:
            modality, modality_source = (
                ("CT" if _looks_like_ct(self._reference_values()) else "MR"),
                "intensity",
            )
        self.modality, self.modality_source = modality, modality_source

    # -- geometry ----------------------------------------------------------------------------------------------
    def _array_axis(self, axis: str) -> int:
        if axis not in _PLANES:
            raise VolumeError(f"{self.name}: unknown axis {axis!r}; use one of {', '.join(AXES)}")
        return self._world.index(_PLANES[axis][0])

    @property
    def native_axis(self) -> str:
        """The plane the volume was acquired (stacked) in: reading it touches only the slices shown."""
        return next(name for name, plane in _PLANES.items() if plane[0] == self._world[2])

    def n_slices(self, axis: str = "axial") -> int:
        return self.shape[self._array_axis(axis)]

    # -- intensities -------------------------------------------------------------------------------------------
    def _reference_values(self) -> np.ndarray:
        """Values of up to 8 stack slices spread through the volume (cached), for percentiles and CT detection."""
        with self._lock:
            if self._reference is None:
                ks = _spread(self.shape[2], _REFERENCE_SLICES)
                planes = self._reader(2, ks)
                values = np.concatenate(
                    [p[::4, ::4].ravel() if p.size > 65536 else p.ravel() for p in planes]
                )
                self._reference = values[np.isfinite(values)]
            return self._reference

    def intensity_range(self) -> tuple[float, float]:
        """The (1st, 99th) percentile of the volume, the scale of every non-CT slice."""
        if self._range is None:
            values = self._reference_values()
            if values.size == 0:
                raise VolumeError(f"{self.name}: the volume has no finite values")
            low, high = (float(v) for v in np.percentile(values, PERCENTILES))
            if high <= low:
                low, high = float(values.min()), float(values.max())
            self._range = (low, high if high > low else low + 1.0)
        return self._range

    def _channels(self, windows) -> tuple[list[tuple[float, float]], list[str]]:
        """[(low, high)] per channel and their names."""
        if self.modality != "CT":
            if windows is not None:
                raise VolumeError(
                    f"{self.name}: CT windows apply to Hounsfield units, but this volume is {self.modality} "
                    f"({self.modality_source}); pass modality='CT' to load_volume if it is a CT"
                )
            low, high = self.intensity_range()
            return [(low, high)], [f"{self.modality} percentiles {PERCENTILES[0]:g}-{PERCENTILES[1]:g}"]
        windows = DEFAULT_CT_WINDOWS if windows is None else windows
        if isinstance(windows, str) or (
            len(windows) == 2 and all(isinstance(w, (int, float)) for w in windows)
        ):
            windows = (windows,)
        if len(windows) not in (1, 3):
            raise VolumeError(f"{self.name}: give 1 window (gray) or 3 windows (RGB), got {len(windows)}")
        bounds, names = [], []
        for window in windows:
            if isinstance(window, str):
                if window not in CT_WINDOWS:
                    raise VolumeError(
                        f"{self.name}: unknown window {window!r}; known: {', '.join(CT_WINDOWS)}"
                    )
                level, width = CT_WINDOWS[window]
                label = window
            else:
                level, width = (float(v) for v in window)
                label = "custom"
            if not width > 0:
                raise VolumeError(f"{self.name}: window width must be positive, got {width}")
            bounds.append((level - width / 2, level + width / 2))
            names.append(f"{label} (W{_mm(width)}/L{_mm(level)})")
        return bounds, names

    # -- rendering ---------------------------------------------------------------------------------------------
    def slices(
        self,
        n_slices: int = DEFAULT_SAMPLED_SLICES,
        axis: str = "axial",
        windows=None,
        indices: Sequence[int] | None = None,
        max_side: int = 512,
    ) -> VolumeSlices:
        """Render `n_slices` evenly spaced slices along `axis` (or the slices `indices`, 0 = first in order).

        `windows`: for CT, window names from `CT_WINDOWS` or (level, width) pairs, 1 (gray) or 3 (RGB; default
        lung, soft tissue, bone); must be None for other modalities (percentile scaling).
        """
        a = self._array_axis(axis)
        normal, rows_to, cols_to, direction = _PLANES[axis]
        if max_side < 1:
            raise VolumeError(f"{self.name}: max_side must be at least 1, got {max_side}")
        n_total = self.shape[a]
        if indices is None:
            if not 1 <= n_slices <= self.limits.max_sampled:
                raise VolumeError(
                    f"{self.name}: n_slices={n_slices} is outside 1..{self.limits.max_sampled} (VolumeLimits.max_sampled)"
                )
            indices = _spread(n_total, n_slices)
        else:
            indices = sorted({int(i) for i in indices})
            if not indices or len(indices) > self.limits.max_sampled:
                raise VolumeError(
                    f"{self.name}: give 1..{self.limits.max_sampled} slice indices, got {len(indices)}"
                )
            if indices[0] < 0 or indices[-1] >= n_total:
                raise VolumeError(f"{self.name}: slice indices must be in 0..{n_total - 1} along {axis}")
        if a != 2 and self._irregular():
            raise VolumeGeometryError(
                f"{self.name}: the slices are not evenly spaced (gaps), so the volume cannot be resliced "
                f"{axis}ly; use axis='{self.native_axis}'"
            )
        bounds, channel_names = self._channels(windows)
        ascending = self.directions[a, normal] > 0
        array_indices = [k if ascending else n_total - 1 - k for k in indices]
        # Read in increasing array order (a gzip stream only seeks forward), then put back in display order.
        order = [int(i) for i in np.argsort(array_indices)]
        planes: list[np.ndarray] = [np.empty(0)] * len(indices)
        for i, plane in zip(order, self._reader(a, [array_indices[i] for i in order]), strict=True):
            planes[i] = plane

        # In-plane geometry: the two remaining array axes, transposed/flipped to the display convention.
        b, c = (x for x in range(3) if x != a)
        transpose = self._world[b] == cols_to[0]
        row_axis, col_axis = (c, b) if transpose else (b, c)
        flip_rows = np.sign(self.directions[row_axis, rows_to[0]]) != rows_to[1]
        flip_cols = np.sign(self.directions[col_axis, cols_to[0]]) != cols_to[1]
        spacing_rows, spacing_cols = self.spacing[row_axis], self.spacing[col_axis]
        images = []
        for plane in planes:
            plane = plane.T if transpose else plane
            plane = plane[::-1] if flip_rows else plane
            plane = plane[:, ::-1] if flip_cols else plane
            images.append(_to_image(plane, bounds, spacing_rows, spacing_cols, max_side))
        height, width = (self.shape[row_axis], self.shape[col_axis])
        shown_spacing = (height * spacing_rows / images[0].height, width * spacing_cols / images[0].width)

        if a == 2:
            along = self.positions[array_indices]
            spacing = self.spacing[2]
        else:
            along = np.asarray(array_indices, dtype=np.float64) * self.spacing[a]
            spacing = self.spacing[a]
        positions = [round(float(abs(p - along[0])), 3) for p in along]
        gaps = self.gaps if a == 2 else []
        if gaps and not ascending:
            gaps = [
                {
                    "after_index": n_total - 2 - g["after_index"],
                    "step_mm": g["step_mm"],
                    "missing": g["missing"],
                }
                for g in reversed(gaps)
            ]
        return VolumeSlices(
            images=images,
            axis=axis,
            direction=direction,
            indices=list(indices),
            positions_mm=positions,
            n_total=n_total,
            spacing_mm=round(spacing, 4),
            pixel_spacing_mm=(round(shown_spacing[0], 4), round(shown_spacing[1], 4)),
            modality=self.modality,
            channels=channel_names,
            gaps=gaps,
        )

    def _irregular(self) -> bool:
        steps = np.diff(self.positions)
        return bool(steps.size and np.any(np.abs(steps - self.spacing[2]) > _step_tolerance(self.spacing[2])))

    def metadata(self) -> dict[str, Any]:
        """JSON-safe facts about the volume (no patient data)."""
        return {
            "source": self.source,
            "shape": {axis: self.n_slices(axis) for axis in AXES},
            "native_axis": self.native_axis,
            "spacing_mm": {axis: round(self.spacing[self._array_axis(axis)], 4) for axis in AXES},
            "modality": self.modality,
            "modality_source": self.modality_source,
            "obliquity_deg": round(self.obliquity_deg, 2),
            "gaps": [dict(g) for g in self.gaps],
            **self.info,
        }


def _step_tolerance(spacing: float) -> float:
    return max(_SPACING_TOLERANCE * spacing, 0.01)


def _spread(n: int, k: int) -> list[int]:
    """k indices evenly spread over 0..n-1 (the centres of k equal parts), all of them if k >= n."""
    if k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _world_axes(directions: np.ndarray, name: str) -> list[int]:
    """The patient axis (0 = x/left, 1 = y/posterior, 2 = z/superior) nearest to each array axis."""
    world = [int(np.argmax(np.abs(d))) for d in directions]
    if sorted(world) != [0, 1, 2]:
        raise VolumeGeometryError(
            f"{name}: the volume is so oblique (about 45 degrees) that its axes cannot be matched to "
            "axial, coronal and sagittal"
        )
    return world


def _looks_like_ct(values: np.ndarray) -> bool:
    """Hounsfield units: air at about -1000 HU in at least 1% of the voxels, nothing below the -3024 padding."""
    if values.size == 0:
        return False
    return bool(np.mean(values <= -900) >= 0.01 and values.min() >= -3100 and values.max() <= 40000)


def _to_image(
    plane: np.ndarray, bounds, spacing_rows: float, spacing_cols: float, max_side: int
) -> Image.Image:
    values = np.where(np.isfinite(plane), plane, -np.inf).astype(np.float32)
    channels = [
        (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        for low, high in bounds
    ]
    rgb = np.stack(channels * 3 if len(channels) == 1 else channels, axis=-1)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    # Square pixels: the finer spacing sets the pixel size; then at most max_side on a side.
    pixel = min(spacing_rows, spacing_cols)
    height, width = plane.shape[0] * spacing_rows / pixel, plane.shape[1] * spacing_cols / pixel
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: paths, bytes, folders, zips, lists of files
# ---------------------------------------------------------------------------------------------------------------


class _Member:
    """One input file: a path, bytes in memory, or a member of an open zip (read on demand)."""

    def __init__(
        self, name: str, path: Path | None = None, data: bytes | None = None, zip_info=None, zf=None
    ):
        self.name, self.path, self.data, self.zip_info, self.zf = name, path, data, zip_info, zf

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is not None:
            return self.path.read_bytes()
        with self.zf.open(self.zip_info) as f:  # zipfile stops at the declared (already checked) size
            return f.read()

    def source(self):
        """What pydicom.dcmread takes: a path (read lazily) or a bytes stream."""
        return str(self.path) if self.path is not None else io.BytesIO(self.read())


def _hidden(name: str) -> bool:
    parts = Path(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or Path(name).name.upper() == "DICOMDIR"


def _sniff(head: bytes, name: str) -> str:
    """'zip', 'nifti', 'dicom' or 'unknown' from the first bytes (and the name, for NIfTI)."""
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: checked as NIfTI below (a gzip that is not one fails with a clear error)
    if head[128:132] == b"DICM":
        return "dicom"
    if (len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")) or head[4:8] in (
        b"n+2\x00",
        b"ni2\x00",
    ):
        return "nifti"
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if lower.endswith((".dcm", ".dicom")):
        return "dicom"
    return "unknown"


def _check_stored(n_bytes: int, name: str, limits: VolumeLimits) -> None:
    if n_bytes > limits.max_bytes:
        raise VolumeTooLargeError(
            f"{name}: {n_bytes / 2**20:,.1f} MiB is over the {limits.max_bytes / 2**20:,.0f} MiB limit on a volume's files"
        )


def _check_files(n_files: int, name: str, limits: VolumeLimits) -> None:
    if n_files > limits.max_files:
        raise VolumeTooLargeError(f"{name}: more than {limits.max_files} files (VolumeLimits.max_files)")


def _zip_members(zf: zipfile.ZipFile, name: str, limits: VolumeLimits) -> list[_Member]:
    infos = [i for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)]
    _check_files(len(infos), name, limits)
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_bytes:
        raise VolumeTooLargeError(
            f"{name}: the zip declares {declared / 2**20:,.1f} MiB once extracted, over the "
            f"{limits.max_bytes / 2**20:,.0f} MiB limit (possible zip bomb); refused before extracting it"
        )
    return [
        _Member(f"{name}:{i.filename}", zip_info=i, zf=zf) for i in sorted(infos, key=lambda i: i.filename)
    ]


def _open_zip(path_or_data, name: str, limits: VolumeLimits) -> list[_Member]:
    try:
        zf = zipfile.ZipFile(path_or_data if isinstance(path_or_data, Path) else io.BytesIO(path_or_data))
    except (zipfile.BadZipFile, OSError) as e:
        raise VolumeError(f"{name}: not a readable zip file ({e})") from None
    return _zip_members(zf, name, limits)


def _collect(src, name: str | None, limits: VolumeLimits) -> tuple[str, Any, str]:
    """(kind, payload, name): ('nifti', Path | bytes, name) or ('dicom', [_Member], name)."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = name or str(src)
        if path.is_dir():
            files = []
            for root, dirs, filenames in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for filename in sorted(filenames):
                    relative = os.path.relpath(os.path.join(root, filename), path)
                    if not _hidden(relative):
                        files.append(Path(root) / filename)
                        _check_files(len(files), name, limits)
            _check_stored(sum(f.stat().st_size for f in files), name, limits)
            return "dicom", [_Member(str(f), path=f) for f in files], name
        if not path.is_file():
            raise VolumeError(f"{name}: no such file or folder")
        _check_stored(path.stat().st_size, name, limits)
        with path.open("rb") as f:
            head = f.read(1024)
        kind = _sniff(head, name)
        if kind == "zip":
            return _zip_or_nifti(_open_zip(path, name, limits), name, limits)
        if kind == "nifti":
            return "nifti", path, name
        return "dicom", [_Member(name, path=path)], name
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = name or "<volume bytes>"
        _check_stored(len(data), name, limits)
        if not data:
            raise VolumeError(f"{name}: empty file")
        kind = _sniff(data[:1024], name)
        if kind == "zip":
            return _zip_or_nifti(_open_zip(data, name, limits), name, limits)
        if kind == "nifti":
            return "nifti", data, name
        return "dicom", [_Member(name, data=data)], name
    if hasattr(src, "read"):
        data = src.read(limits.max_bytes + 1)
        return _collect(data, name or getattr(src, "name", None) or "<volume stream>", limits)
    if isinstance(src, Sequence):
        items = list(src)
        if not items:
            raise VolumeError(f"{name or '<volume>'}: no files given")
        if len(items) == 1:
            item = items[0]
            return (
                _collect(item[1], str(item[0]), limits)
                if isinstance(item, tuple)
                else _collect(item, name, limits)
            )
        _check_files(len(items), name or "<volume files>", limits)
        members, total = [], 0
        for i, item in enumerate(items):
            if isinstance(item, tuple):
                item_name, data = str(item[0]), bytes(item[1])
                members.append(_Member(item_name, data=data))
                total += len(data)
            elif isinstance(item, (bytes, bytearray, memoryview)):
                members.append(_Member(f"<file {i + 1}>", data=bytes(item)))
                total += len(item)
            elif isinstance(item, (str, os.PathLike)) and Path(item).is_file():
                members.append(_Member(str(item), path=Path(item)))
                total += Path(item).stat().st_size
            else:
                raise VolumeError(f"{item!r}: not a file, nor a (name, bytes) pair")
        name = name or f"<{len(items)} files>"
        _check_stored(total, name, limits)
        return "dicom", members, name
    raise VolumeError(f"cannot read a volume from a {type(src).__name__}")


def _zip_or_nifti(members: list[_Member], name: str, limits: VolumeLimits) -> tuple[str, Any, str]:
    """A zip holding one NIfTI file is that volume; any other zip is a DICOM series."""
    if len(members) == 1 and members[0].name.lower().endswith((".nii", ".nii.gz")):
        return "nifti", members[0].read(), members[0].name
    if not members:
        raise VolumeError(f"{name}: the zip holds no files")
    return "dicom", members, name


# ---------------------------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------------------------


def _dicom_header(member: _Member):
    """The data set without pixel data, or None for a file that is not DICOM or holds no image."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        source = member.source()
        fp = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115 - closed below
        try:
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
        finally:
            if isinstance(source, str):
                fp.close()
        # A deflated data set is inflated whole by pydicom, header included: refused before (a zip-bomb risk).
        if meta.get("TransferSyntaxUID", None) == pydicom.uid.DeflatedExplicitVRLittleEndian:
            raise VolumeError(
                f"{member.name}: deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is not accepted in a volume"
            )
        if isinstance(source, io.BytesIO):
            source.seek(0)
        ds = pydicom.dcmread(source, stop_before_pixels=True, defer_size="512 KB")  # large values left unread
    except InvalidDicomError:
        return None
    except VolumeError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types; re-raised with a clear reason
        raise VolumeError(f"{member.name}: unreadable DICOM header ({type(e).__name__})") from None
    sop_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop_class == "1.2.840.10008.1.3.10" or "Rows" not in ds or "Columns" not in ds:
        return None  # a DICOMDIR, a report, a structure set ...
    return ds


def _floats(ds, keyword: str, n: int, member: _Member) -> np.ndarray:
    value = ds.get(keyword, None)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise VolumeGeometryError(
            f"{member.name}: {keyword} is missing or malformed, so the slice cannot be placed in the volume"
        )
    return values


def _series_summary(uid: str, items: list) -> dict[str, Any]:
    ds = items[0][1]
    return {
        "series_uid": uid,
        "files": len(items),
        "modality": str(ds.get("Modality", "") or ""),
        "description": str(ds.get("SeriesDescription", "") or ""),
    }


def _dicom_volume(
    members: list[_Member],
    name: str,
    limits: VolumeLimits,
    series_uid: str | None,
    modality: str | None,
    allow_gaps: bool,
) -> Volume:
    headers, skipped = [], 0
    for member in members:
        ds = _dicom_header(member)
        if ds is None:
            skipped += 1
        else:
            headers.append((member, ds))
    if not headers:
        raise VolumeError(f"{name}: no DICOM image files found ({skipped} other file(s) skipped)")

    series: dict[str, list] = {}
    for member, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or "(none)"), []).append((member, ds))
    summaries = [_series_summary(uid, items) for uid, items in series.items()]
    if series_uid is not None:
        if series_uid not in series:
            raise MixedSeriesError(
                f"{name}: series {series_uid} is not among the {len(series)} series given: "
                + "; ".join(_describe(s) for s in summaries),
                summaries,
            )
        items = series[series_uid]
    elif len(series) > 1:
        raise MixedSeriesError(
            f"{name}: the files belong to {len(series)} DICOM series; give the files of one series, or pick one "
            "with series_uid=...: " + "; ".join(_describe(s) for s in summaries),
            summaries,
        )
    else:
        items = next(iter(series.values()))

    first_member, first = items[0]
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in items):
        raise VolumeError(
            f"{first_member.name}: multi-frame (enhanced) DICOM volumes are not supported; export the series as "
            "single-frame files"
        )
    if len(items) < 2:
        raise VolumeError(f"{first_member.name}: one DICOM slice (frames: {frames}) is not a volume")
    if len(items) > limits.max_slices:
        raise VolumeTooLargeError(
            f"{name}: the series has {len(items)} slices, over the limit of {limits.max_slices} (VolumeLimits.max_slices)"
        )

    # Everything below comes from the headers: sizes first (no pixel data has been read).
    rows, cols = int(first.Rows), int(first.Columns)
    decoded = 0
    for member, ds in items:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeGeometryError(
                f"{member.name}: slice size {int(ds.Rows)}x{int(ds.Columns)} differs from {rows}x{cols} of "
                f"{first_member.name}"
            )
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise VolumeError(
                f"{member.name}: colour DICOM ({samples} samples per pixel) is not a CT/MRI volume"
            )
        decoded += rows * cols * ((int(ds.get("BitsAllocated", 16) or 16) + 7) // 8)
    if rows * cols > limits.max_slice_pixels:
        raise VolumeTooLargeError(
            f"{first_member.name}: {rows}x{cols} pixels per slice is over the limit of {limits.max_slice_pixels:,}"
        )
    voxels = rows * cols * len(items)
    if voxels > limits.max_voxels:
        raise VolumeTooLargeError(f"{name}: {voxels:,} voxels is over the limit of {limits.max_voxels:,}")
    if decoded > limits.max_decoded_bytes:
        raise VolumeTooLargeError(
            f"{name}: the headers declare {decoded / 2**20:,.1f} MiB of pixel data, over the "
            f"{limits.max_decoded_bytes / 2**20:,.0f} MiB limit; refused before decompressing it"
        )

    # Geometry: one orientation and pixel spacing, orthonormal cosines, no tilt, positions along the normal.
    orientation = _floats(first, "ImageOrientationPatient", 6, first_member)
    pixel_spacing = _floats(first, "PixelSpacing", 2, first_member)
    for member, ds in items:
        other = _floats(ds, "ImageOrientationPatient", 6, member)
        if np.max(np.abs(other - orientation)) > 1e-3:
            raise VolumeGeometryError(
                f"{member.name}: ImageOrientationPatient {np.round(other, 4).tolist()} differs from "
                f"{np.round(orientation, 4).tolist()} of {first_member.name}; the slices are not one stack"
            )
        other = _floats(ds, "PixelSpacing", 2, member)
        if np.max(np.abs(other - pixel_spacing)) > 1e-3 * max(1.0, float(pixel_spacing.max())):
            raise VolumeGeometryError(
                f"{member.name}: PixelSpacing {other.tolist()} differs from {pixel_spacing.tolist()} of "
                f"{first_member.name}"
            )
        tilt = ds.get("GantryDetectorTilt", None)
        if tilt not in (None, "") and abs(float(tilt)) > 0.01:
            raise VolumeGeometryError(
                f"{member.name}: gantry tilt of {float(tilt):g} degrees; tilted acquisitions are not supported "
                "(resample the series to an orthogonal grid first)"
            )
    if np.any(pixel_spacing <= 0):
        raise VolumeGeometryError(
            f"{first_member.name}: PixelSpacing {pixel_spacing.tolist()} is not positive"
        )
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_cosine) - 1) > 1e-3
        or abs(np.linalg.norm(col_cosine) - 1) > 1e-3
        or abs(row_cosine @ col_cosine) > 1e-3
    ):
        raise VolumeGeometryError(
            f"{first_member.name}: ImageOrientationPatient {np.round(orientation, 4).tolist()} is not two "
            "orthogonal unit vectors"
        )
    normal = np.cross(row_cosine, col_cosine)
    ipp = np.stack([_floats(ds, "ImagePositionPatient", 3, m) for m, ds in items])
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    items, ipp, along = [items[i] for i in order], ipp[order], along[order]
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < 0.01)
    if duplicate.size:
        i = int(duplicate[0])
        raise VolumeGeometryError(
            f"{items[i + 1][0].name}: at the same position ({along[i]:.2f} mm along the normal) as "
            f"{items[i][0].name}; {duplicate.size + 1} or more slices share positions (several acquisitions, "
            "echoes or time points in one series?)"
        )
    offsets = np.diff(ipp, axis=0) - steps[:, None] * normal[None, :]
    angles = np.degrees(np.arctan2(np.linalg.norm(offsets, axis=1), steps))
    if angles.max() > _MAX_TILT_DEG:
        i = int(np.argmax(angles))
        raise VolumeGeometryError(
            f"{items[i + 1][0].name}: the slices are not stacked along their normal (sheared by {angles[i]:.1f} "
            "degrees: gantry tilt?); tilted acquisitions are not supported"
        )
    spacing = float(np.median(steps))
    off = np.abs(steps - spacing) > _step_tolerance(spacing)
    gaps = []
    for i in np.flatnonzero(off):
        if steps[i] > _GAP_FACTOR * spacing:
            gaps.append(
                {
                    "after_index": int(i),
                    "step_mm": round(float(steps[i]), 3),
                    "missing": max(1, round(float(steps[i]) / spacing) - 1),
                }
            )
    if not allow_gaps:
        if gaps:
            described = ", ".join(
                f"{g['step_mm']:g} mm after {items[g['after_index']][0].name} (about {g['missing']} slice(s))"
                for g in gaps[:5]
            )
            raise VolumeGeometryError(
                f"{name}: slices are missing: the median spacing is {spacing:.3g} mm but there are "
                f"{len(gaps)} gap(s): {described}. Add the missing files, or pass allow_gaps=True to accept "
                "the gaps (they are reported with the slices)"
            )
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise VolumeGeometryError(
                f"{items[i + 1][0].name}: irregular slice spacing ({steps[i]:.3g} mm from {items[i][0].name}, "
                f"median {spacing:.3g} mm); pass allow_gaps=True to accept it"
            )

    tag_modality = str(first.get("Modality", "") or "").upper()
    if modality is not None:
        modality_source = "argument"
    elif tag_modality:
        modality, modality_source = tag_modality, "DICOM Modality"
    else:
        modality_source = "intensity"
    info = {"files_skipped": skipped, "series_uid": str(first.get("SeriesInstanceUID", "") or "")}
    info["dicom"] = {t: str(first.get(t)) for t in SAFE_TAGS if first.get(t, None) not in (None, "")}
    sorted_members = [m for m, _ in items]

    def read_slice(k: int) -> np.ndarray:
        member = sorted_members[k]
        return _dicom_pixels(member, rows, cols, invert=modality not in ("CT", None))

    cache: dict[int, np.ndarray] = {}
    cache_lock = threading.Lock()

    def cached(k: int) -> np.ndarray:
        with cache_lock:
            if k in cache:
                return cache[k]
        value = read_slice(k)
        with cache_lock:
            if len(cache) >= 2 * limits.max_sampled:
                cache.pop(next(iter(cache)))
            cache[k] = value
        return value

    def reader(a: int, ks: Sequence[int]) -> list[np.ndarray]:
        if a == 2:
            return [cached(k) for k in ks]
        # Reslicing: every stack slice contributes one line to each requested plane.
        lines: list[list[np.ndarray]] = [[] for _ in ks]
        for k in range(len(sorted_members)):
            plane = read_slice(k)
            for j, index in enumerate(ks):
                lines[j].append(plane[index, :] if a == 0 else plane[:, index])
        return [np.stack(line, axis=1) for line in lines]

    directions = np.stack([col_cosine, row_cosine, normal])
    return Volume(
        source="dicom",
        name=name,
        shape=(rows, cols, len(items)),
        directions=directions,
        spacing=(float(pixel_spacing[0]), float(pixel_spacing[1]), spacing),
        positions=along - along[0],
        reader=reader,
        modality=modality,
        modality_source=modality_source,
        limits=limits,
        gaps=gaps,
        info=info,
    )


def _describe(summary: dict[str, Any]) -> str:
    text = f"{summary['series_uid']} ({summary['files']} files"
    if summary["modality"]:
        text += f", {summary['modality']}"
    if summary["description"]:
        text += f", '{summary['description']}'"
    return text + ")"


def _dicom_pixels(member: _Member, rows: int, cols: int, invert: bool) -> np.ndarray:
    """One slice in physical units (RescaleSlope/Intercept applied) as float32 (rows, cols)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(member.source())
    except Exception as e:  # noqa: BLE001 - pydicom raises many types
        raise VolumeError(f"{member.name}: unreadable DICOM file ({type(e).__name__})") from None
    if "PixelData" not in ds:
        raise VolumeError(f"{member.name}: the DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (
            " (compressed DICOM: install pylibjpeg and its plugins, or python-gdcm)"
            if syntax and syntax.is_compressed
            else ""
        )
        raise VolumeError(
            f"{member.name}: the pixel data cannot be decoded ({type(e).__name__}, transfer syntax "
            f"{getattr(syntax, 'name', syntax)}){hint}"
        ) from None
    if pixels.shape != (rows, cols):
        raise VolumeError(f"{member.name}: pixel data of shape {pixels.shape}, expected ({rows}, {cols})")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if invert and str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = -values
    return values


# ---------------------------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------------------------


def _nifti_volume(payload, name: str, limits: VolumeLimits, modality: str | None) -> Volume:
    import nibabel as nib

    path = payload if isinstance(payload, Path) else None
    data = None if path is not None else payload

    def stream():
        raw = path.open("rb") if path is not None else io.BytesIO(data)
        magic = raw.read(2)
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw

    try:
        with stream() as s:
            head = s.read(540)  # the header only (through gzip: nothing more is decompressed)
    except (OSError, EOFError) as e:
        raise VolumeError(f"{name}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    if 348 in sizes and len(head) >= 348:
        image_class, header_class, size = nib.Nifti1Image, nib.Nifti1Header, 348
    elif 540 in sizes and len(head) >= 540:
        image_class, header_class, size = nib.Nifti2Image, nib.Nifti2Header, 540
    else:
        raise VolumeError(f"{name}: not a NIfTI-1 or NIfTI-2 file (no valid header)")
    try:
        header = header_class.from_fileobj(io.BytesIO(head[:size]))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types
        raise VolumeError(f"{name}: invalid NIfTI header ({type(e).__name__}: {e})") from None
    if bytes(header["magic"]).rstrip(b"\x00") in (b"ni1", b"ni2"):
        raise VolumeError(
            f"{name}: a two-file NIfTI (.hdr/.img) is not supported; convert it to one .nii file"
        )
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(f"{name}: a NIfTI image of shape {shape} is not a 3D volume")
    if len(shape) > 4 and any(n > 1 for n in shape[4:]):
        raise VolumeError(f"{name}: NIfTI images with more than 4 dimensions {shape} are not supported")
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise VolumeError(f"{name}: NIfTI data type {dtype} (colour or complex) is not a CT/MRI volume")
    n0, n1, n2 = shape[:3]
    n_volumes = int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1
    if n2 > limits.max_slices:
        raise VolumeTooLargeError(f"{name}: {n2} slices is over the limit of {limits.max_slices}")
    if max(n0 * n1, n0 * n2, n1 * n2) > limits.max_slice_pixels:
        raise VolumeTooLargeError(
            f"{name}: a slice of the {n0}x{n1}x{n2} volume is over {limits.max_slice_pixels:,} pixels"
        )
    if n0 * n1 * n2 > limits.max_voxels:
        raise VolumeTooLargeError(
            f"{name}: {n0 * n1 * n2:,} voxels is over the limit of {limits.max_voxels:,}"
        )
    # What reading the first volume decompresses: everything before the voxels (extensions) and the volumes.
    decoded = int(header["vox_offset"]) + n0 * n1 * n2 * n_volumes * dtype.itemsize
    if decoded > limits.max_decoded_bytes:
        raise VolumeTooLargeError(
            f"{name}: the header declares {decoded / 2**20:,.1f} MiB of voxel data, over the "
            f"{limits.max_decoded_bytes / 2**20:,.0f} MiB limit (possible decompression bomb); refused before "
            "decompressing it"
        )
    affine = header.get_best_affine()
    matrix = np.asarray(affine[:3, :3], dtype=np.float64)
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(spacing <= 0):
        raise VolumeGeometryError(
            f"{name}: the NIfTI affine has a zero or invalid voxel size {spacing.tolist()}"
        )
    directions = (matrix / spacing).T  # rows: the unit vector of each voxel axis, in RAS
    cosines = np.abs(directions @ directions.T - np.eye(3))
    if cosines.max() > 1e-3:
        raise VolumeGeometryError(
            f"{name}: the NIfTI affine is sheared (its axes are not orthogonal: gantry tilt?); resample it first"
        )
    directions = directions * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS, as DICOM

    image = None
    image_lock = threading.Lock()

    def reader(a: int, ks: Sequence[int]) -> list[np.ndarray]:
        nonlocal image
        out = []
        with image_lock:
            try:
                if image is None:
                    image = image_class.from_stream(stream())
                tail = (0,) * (len(shape) - 3)  # the first volume of a 4D file
                if a == 2:
                    for k in ks:
                        out.append(
                            np.asarray(image.dataobj[(slice(None), slice(None), int(k), *tail)], np.float32)
                        )
                else:
                    # Reslicing: one pass through the file in chunks of stack slices (a gzip stream reads forward
                    # only), taking from each the lines of the requested planes.
                    lines: list[list[np.ndarray]] = [[] for _ in ks]
                    step = max(1, (32 * 2**20) // (n0 * n1 * 4))
                    for k0 in range(0, n2, step):
                        chunk = np.asarray(
                            image.dataobj[(slice(None), slice(None), slice(k0, k0 + step), *tail)]
                        )
                        for j, index in enumerate(ks):
                            lines[j].append(chunk[index, :, :] if a == 0 else chunk[:, index, :])
                    out = [np.concatenate(line, axis=1).astype(np.float32) for line in lines]
            except Exception as e:  # noqa: BLE001 - nibabel, gzip and zlib raise many types
                raise VolumeError(
                    f"{name}: the NIfTI voxel data cannot be read ({type(e).__name__}: {e})"
                ) from None
        return out

    return Volume(
        source="nifti",
        name=name,
        shape=(n0, n1, n2),
        directions=directions,
        spacing=tuple(float(s) for s in spacing),
        positions=np.arange(n2, dtype=np.float64) * float(spacing[2]),
        reader=reader,
        modality=modality,
        modality_source="argument" if modality is not None else "intensity",
        limits=limits,
        info={"volumes_in_file": n_volumes, "volume_used": 0} if n_volumes > 1 else {},
    )


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _normalise_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    value = modality.strip().upper()
    value = {"MRI": "MR"}.get(value, value)
    if not value:
        raise ValueError("modality must be a DICOM modality such as 'CT' or 'MR'")
    return value


def load_volume(
    src,
    *,
    name: str | None = None,
    series_uid: str | None = None,
    modality: str | None = None,
    allow_gaps: bool = False,
    limits: VolumeLimits | None = None,
) -> Volume:
    """Read and validate a volume's headers; pixel data is read later, only for the slices rendered.

    `src`: a NIfTI file (`.nii`, `.nii.gz`; path or bytes), a DICOM series as a folder, a zip (path or bytes), or a
    list of files (paths, bytes, or (name, bytes) pairs). `series_uid` picks one series when several are given.
    `modality` ("CT", "MR", ...) overrides the DICOM Modality tag or, for NIfTI, the intensity-based guess (CT when
    about -1000 HU air is present). `allow_gaps` accepts missing slices / irregular spacing (reported in `gaps`).
    """
    limits = limits or VolumeLimits()
    modality = _normalise_modality(modality)
    kind, payload, name = _collect(src, name, limits)
    if kind == "nifti":
        return _nifti_volume(payload, name, limits, modality)
    return _dicom_volume(payload, name, limits, series_uid, modality, allow_gaps)


def volume_slices(
    src,
    n_slices: int = DEFAULT_SAMPLED_SLICES,
    axis: str = "axial",
    windows=None,
    max_side: int = 512,
    **load_kwargs,
) -> VolumeSlices:
    """`load_volume(src, **load_kwargs).slices(n_slices, axis, windows, max_side=max_side)` in one call."""
    return load_volume(src, **load_kwargs).slices(
        n_slices=n_slices, axis=axis, windows=windows, max_side=max_side
    )


def is_volume_file(data: bytes, name: str = "") -> bool:
    """True for what only `load_volume` reads: a zip, or a NIfTI file (by content, or by a .nii/.nii.gz name)."""
    return _sniff(data[:1024], name) in ("zip", "nifti")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medllava.volumes", description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", nargs="+", help="a NIfTI file, a DICOM folder or zip, or DICOM files of one series"
    )
    parser.add_argument("--n-slices", type=int, default=DEFAULT_SAMPLED_SLICES)
    parser.add_argument("--axis", default="axial", choices=AXES)
    parser.add_argument("--windows", nargs="+", default=None, help=f"CT windows: {', '.join(CT_WINDOWS)}")
    parser.add_argument("--modality", default=None, help="override: CT or MR")
    parser.add_argument("--series-uid", default=None)
    parser.add_argument("--allow-gaps", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="folder for slice_<index>.png")
    args = parser.parse_args(argv)
    source = args.source[0] if len(args.source) == 1 else args.source
    volume = load_volume(
        source, series_uid=args.series_uid, modality=args.modality, allow_gaps=args.allow_gaps
    )
    shown = volume.slices(n_slices=args.n_slices, axis=args.axis, windows=args.windows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for index, image in zip(shown.indices, shown.images, strict=True):
            image.save(args.out / f"slice_{index:04d}.png")
    print(json.dumps({"volume": volume.metadata(), "slices": shown.metadata()}, indent=2))


if __name__ == "__main__":
    main()
