"""Volumes as the server shows them to the model: a CT/MRI upload -> a few rendered slices, under the serving limits.

Shared by the chat and the API. A volume (a NIfTI file, a zip of a DICOM series, or the DICOM files of one
series) is read with `medllava.volumes` and becomes `n_slices` images plus a line of text saying where they are
(`medllava.image_roles`). Its slices count as images against `Limits.max_images`, since each costs the prompt
tokens of one image: a volume gets `DEFAULT_VOLUME_SLICES` slices or the room that is left, and an explicit slice
count must fit. Every other volume limit (`volume_limits`) is checked from the headers before pixel data is read.
Error texts from here never carry a DICOM SeriesInstanceUID (`volume_error_text`).

    volume = open_volume("ct.zip", "upload 1", engine.limits)
    shown = show_slices(volume, engine.limits, images_before=0)         # 8 slices (or fewer: the room left)
"""

from __future__ import annotations

from medllava.volumes import (
    AXES,
    CT_WINDOWS,
    MixedSeriesError,
    Volume,
    VolumeError,
    VolumeLimits,
    VolumeSlices,
    load_volume,
)
from serve.engine import Limits

__all__ = [
    "AXES",
    "CT_WINDOWS",
    "DEFAULT_VOLUME_SLICES",
    "MAX_VOLUME_BYTES",
    "TooManyImages",
    "open_volume",
    "show_slices",
    "slice_count",
    "volume_error_text",
    "volume_limits",
]

# Stored bytes of one volume (the NIfTI file, the zip, or the series' files together). Over the API a volume also
# has to fit the request body (64 MiB by default, base64 makes it 4/3 larger: about 48 MiB of volume).
MAX_VOLUME_BYTES = 48 * 2**20
DEFAULT_VOLUME_SLICES = 8
_DEFAULTS = VolumeLimits()


class TooManyImages(ValueError):
    """The conversation has no room left for the images (volume slices count) that were asked for."""


def volume_limits(limits: Limits) -> VolumeLimits:
    """`VolumeLimits` for one upload: the server's bytes, decoded bytes and pixels per slice, at most the number
    of images a conversation may hold rendered at once."""
    return VolumeLimits(
        max_bytes=MAX_VOLUME_BYTES,
        max_decoded_bytes=limits.max_decoded_bytes,
        max_slice_pixels=min(limits.max_image_pixels, _DEFAULTS.max_slice_pixels),
        max_sampled=max(1, min(_DEFAULTS.max_sampled, limits.max_images)),
    )


def slice_count(limits: Limits, images_before: int, requested: int | None = None) -> int:
    """Slices a volume may show: `requested`, or `DEFAULT_VOLUME_SLICES` capped by the images left in the
    conversation; `TooManyImages` when even that does not fit."""
    room = limits.max_images - images_before
    if requested is None:
        if room < 1:
            raise TooManyImages(
                f"no room for a volume: the conversation already holds {images_before} image(s) and the limit is "
                f"{limits.max_images} (a volume's slices count as images)"
            )
        return min(DEFAULT_VOLUME_SLICES, room)
    if requested > room:
        raise TooManyImages(
            f"{requested} volume slices do not fit: the conversation holds {images_before} other image(s) and the "
            f"limit is {limits.max_images} images (a volume's slices count as images)"
        )
    return requested


def open_volume(src, name: str, limits: Limits, modality: str | None = None) -> Volume:
    """Validate a volume's headers under the serving limits (`VolumeError`, `VolumeTooLargeError`)."""
    return load_volume(src, name=name, modality=modality, limits=volume_limits(limits))


def show_slices(
    volume: Volume,
    limits: Limits,
    images_before: int,
    n_slices: int | None = None,
    axis: str = "axial",
    windows=None,
) -> VolumeSlices:
    """The slices the model sees: evenly spread along `axis`, `windows` for CT (None: lung, soft tissue, bone)."""
    n = slice_count(limits, images_before, n_slices)
    return volume.slices(n_slices=n, axis=axis, windows=windows)


def volume_error_text(error: VolumeError) -> str:
    """The error's message, without the SeriesInstanceUIDs a mixed-series error lists."""
    if isinstance(error, MixedSeriesError):
        listed = "; ".join(
            f"series {k}: {s.get('files', '?')} files"
            + (f", {s['modality']}" if s.get("modality") else "")
            + (f", '{s['description']}'" if s.get("description") else "")
            for k, s in enumerate(error.series, start=1)
        )
        return (
            f"the upload holds {len(error.series)} DICOM series ({listed}); send the files of one series only"
        )
    return str(error)
