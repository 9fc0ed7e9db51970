"""The one path from (images, messages) to model inputs, shared by training, evaluation and serving.

Only this module knows how images become `<image>` tokens (through transformers' LlavaProcessor) and how a
medical image file becomes an RGB picture: PNG/JPEG/TIFF/BMP (16-bit, grayscale, EXIF orientation), DICOM
(rescale, VOI window, MONOCHROME1, multi-frame) and NIfTI volumes. Bad input raises `ImageLoadError` naming the
file and the reason. Nothing here prints or logs DICOM header values: `dicom_summary` returns only a whitelist
of non-identifying technical tags.

    from medllava.processing import load_image, encode
    image = load_image("scan.dcm")
    batch = encode(processor, [{"images": [image], "messages": [...]}], add_generation_prompt=True)
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from medllava.safe_text import mark_control_text
from medllava.token_budget import DEFAULT_BUDGET, pooled_side, shrink_rows

# The one pixel limit (per frame/slice); larger is treated as a decompression bomb. The server's
# `Limits.max_image_pixels` defaults to it and passes it on as `load_image(..., max_pixels=...)`.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 512 * 1024 * 1024  # one file as stored (compressed)
# Declared size of the decoded pixel data of a DICOM file (rows x columns x frames x bytes per pixel) or a NIfTI
# volume (dimensions x bytes per voxel), checked from the header before anything is decompressed.
MAX_DECODED_BYTES = 1024 * 1024 * 1024
# A deflated DICOM's header is read through a decompressor that stops after this many bytes.
_DICOM_HEADER_BYTES = 4 * 1024 * 1024
# Technical DICOM tags that identify no one; the only header values this project ever reads out.
SAFE_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsStored",
    "ImageLaterality",
    "ViewPosition",
)
_DICOM_PLUGINS = {
    "JPEG Lossless": "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)",
    "JPEG-LS": "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)",
    "JPEG 2000": "pylibjpeg + pylibjpeg-openjpeg (or python-gdcm)",
    "JPEG Extended": "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)",
    "High-Throughput JPEG 2000": "pylibjpeg + pylibjpeg-openjpeg",
    "RLE": "pylibjpeg + pylibjpeg-rle",
    "Deflated": "a pydicom build with zlib support",
}


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and the reason."""


class ImageTooLargeError(ImageLoadError):
    """An image is over a pixel or decoded-size limit (possibly a decompression bomb)."""


# ---------------------------------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------------------------------


def _name(src) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return getattr(src, "name", None) or f"<{type(src).__name__} image>"


def _read_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageLoadError(f"{src}: no such file")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageLoadError(
                f"{src}: file is {size / 2**20:.0f} MiB, over the {MAX_IMAGE_BYTES // 2**20} MiB limit"
            )
        data = path.read_bytes()
    else:  # file-like
        data = src.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageLoadError(f"{_name(src)}: over the {MAX_IMAGE_BYTES // 2**20} MiB limit")
    if not data:
        raise ImageLoadError(f"{_name(src)}: empty file")
    return data


def is_dicom(data: bytes, name: str = "") -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def is_nifti(data: bytes, name: str = "") -> bool:
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return True
    return len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00")


def _check_pixels(n_pixels: int, name: str, max_pixels: int) -> None:
    if n_pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {n_pixels:,} pixels is over the {max_pixels:,} pixel limit (possible decompression bomb)"
        )


def _check_decoded_bytes(n_bytes: int, what: str, name: str, max_bytes: int) -> None:
    if n_bytes > max_bytes:
        raise ImageTooLargeError(
            f"{name}: the header declares {n_bytes / 2**20:,.1f} MiB of {what}, over the "
            f"{max_bytes / 2**20:,.0f} MiB limit (possible decompression bomb); refused before decompressing it"
        )


def to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linearly map [low, high] (default: 0.5th-99.5th percentile) to 0..255."""
    array = np.asarray(array, dtype=np.float32)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    if low is None or high is None:
        low, high = np.percentile(finite, [0.5, 99.5])
        if high <= low:
            low, high = float(finite.min()), float(finite.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.nan_to_num((array - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(array[..., :3], mode="RGB")
    raise ImageLoadError(f"cannot display an array of shape {array.shape}")


def _load_pil(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # The size is checked against `max_pixels` below, from the header, before any pixel is decoded;
            # Pillow's own process-wide limit stays as a backstop (its DecompressionBombError).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        _check_pixels(image.width * image.height, name, max_pixels)
        image.load()
    except UnidentifiedImageError as e:
        raise ImageLoadError(
            f"{name}: unknown or unsupported image format (supported: PNG, JPEG, TIFF, BMP, GIF, WebP, DICOM, NIfTI)"
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{name}: over the {max_pixels:,} pixel limit (possible decompression bomb): {e}"
        ) from None
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({e})") from e
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale
        return _array_to_rgb(to_uint8(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def dicom_summary(ds) -> dict[str, Any]:
    """Only non-identifying technical tags of a DICOM dataset (never names, IDs, dates or institutions)."""
    out = {}
    for tag in SAFE_DICOM_TAGS:
        value = ds.get(tag, None)
        if value is not None and value != "":
            out[tag] = value if isinstance(value, (int, float)) else str(value)
    return out


def dicom_window(ds) -> tuple[float, float] | None:
    """(centre, width) of the first VOI window in the tags, or None."""
    centre, width = ds.get("WindowCenter", None), ds.get("WindowWidth", None)
    if centre is None or width is None:
        return None
    from pydicom.multival import MultiValue

    centre, width = (float(v[0]) if isinstance(v, MultiValue) else float(v) for v in (centre, width))
    return (centre, width) if width > 0 else None


def _dicom_geometry(ds, name: str) -> tuple[int, int, int, int]:
    """(rows, columns, frames, bytes of pixel data) as the header declares them."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError):
        raise ImageLoadError(f"{name}: DICOM header has a non-numeric image size tag") from None
    if min(rows, cols, n_frames, samples, bits) < 0:
        raise ImageLoadError(f"{name}: DICOM header has a negative image size tag")
    return rows, cols, n_frames, rows * cols * n_frames * samples * ((bits + 7) // 8)


def _read_dicom(data: bytes, name: str, max_pixels: int, max_bytes: int):
    """The dataset, refused from its header if a frame is over `max_pixels` or all frames over `max_bytes`.

    A deflated file (transfer syntax 1.2.840.10008.1.2.1.99) compresses its whole dataset, header included, and
    pydicom inflates all of it at once: here the header is read through a decompressor that stops after a few MiB,
    the declared size checked, and the rest inflated with a bound, so a small file that would inflate to gigabytes
    is refused before it is decompressed.
    """
    import zlib

    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset

    meta = None
    if data[128:132] == b"DICM":
        fp = io.BytesIO(data)
        fp.seek(132)
        meta = _read_file_meta_info(fp)
    if meta is None or meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        ds = pydicom.dcmread(io.BytesIO(data), force=meta is None)  # pixel data still compressed, if it is
        rows, cols, _, n_bytes = _dicom_geometry(ds, name)
    else:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        deflated = data[fp.tell() :]
        head = inflater.decompress(deflated, _DICOM_HEADER_BYTES)
        header = read_dataset(
            io.BytesIO(head),
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, *_: tag >> 16 >= 0x7FE0,
        )
        rows, cols, _, n_bytes = _dicom_geometry(header, name)
        _check_pixels(rows * cols, name, max_pixels)
        _check_decoded_bytes(n_bytes, "pixel data", name, max_bytes)
        # Everything but the pixel data fits in the header allowance; the pixel data in the declared size.
        allowed = max(1, n_bytes + _DICOM_HEADER_BYTES - len(head))
        rest = inflater.decompress(inflater.unconsumed_tail, allowed)
        if inflater.decompress(inflater.unconsumed_tail, 1):  # one byte more than allowed
            raise ImageTooLargeError(
                f"{name}: the deflated data set inflates to more than its header declares "
                f"({(n_bytes + _DICOM_HEADER_BYTES) / 2**20:,.1f} MiB); refused (possible decompression bomb)"
            )
        dataset = read_dataset(DicomBytesIO(head + rest), is_implicit_VR=False, is_little_endian=True)
        ds = FileDataset(name, dataset, data[:128], meta, is_implicit_VR=False, is_little_endian=True)
        ds.set_original_encoding(False, True, dataset._character_set)
    _check_pixels(rows * cols, name, max_pixels)
    _check_decoded_bytes(n_bytes, "pixel data", name, max_bytes)
    return ds


def _load_dicom(data: bytes, name: str, frame: int | None, max_pixels: int, max_bytes: int) -> Image.Image:
    import zlib

    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    try:
        ds = _read_dicom(data, name, max_pixels, max_bytes)
    except ImageLoadError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise ImageLoadError(f"{name}: not a readable DICOM file ({type(e).__name__})") from None
    except zlib.error:
        raise ImageLoadError(f"{name}: not a readable DICOM file (corrupt deflated data set)") from None
    if "PixelData" not in ds:
        raise ImageLoadError(f"{name}: DICOM file has no pixel data")
    _, _, n_frames, _ = _dicom_geometry(ds, name)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageLoadError(f"{name}: frame {frame} requested but the file has {n_frames} frame(s)")
    syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types; re-raised with a clear reason
        syntax_name = getattr(syntax, "name", str(syntax))
        plugin = next((p for key, p in _DICOM_PLUGINS.items() if key.lower() in syntax_name.lower()), None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = f"; install {plugin} to decode it" if plugin else ""
            raise ImageLoadError(f"{name}: unsupported DICOM transfer syntax '{syntax_name}'{hint}") from None
        raise ImageLoadError(f"{name}: DICOM pixel data cannot be decoded ({type(e).__name__})") from None
    if n_frames > 1:
        pixels = pixels[index]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour (ultrasound, photographs)
        if photometric.startswith("YBR") and not getattr(syntax, "is_compressed", False):
            pixels = convert_color_space(pixels, photometric, "RGB")
        return _array_to_rgb(pixels.astype(np.uint8) if pixels.dtype != np.uint8 else pixels)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(
            pixels, ds
        )  # the LUT entries' depth (8 or 16 bit) sets the range, not the index's
        return _array_to_rgb(to_uint8(rgb, 0, 255 if rgb.dtype == np.uint8 else 65535))
    values = apply_modality_lut(pixels, ds)  # rescale slope/intercept -> e.g. Hounsfield units
    window = dicom_window(ds)
    if window is not None:  # linear VOI window from the tags: [centre - width/2, centre + width/2] -> 0..255
        centre, width = window
        image = to_uint8(values, centre - width / 2, centre + width / 2)
    elif "VOILUTSequence" in ds:
        windowed = apply_voi_lut(values, ds, index=0)
        image = to_uint8(windowed, float(np.min(windowed)), float(np.max(windowed)))
    else:
        image = to_uint8(values)
    if photometric == "MONOCHROME1":  # high values are dark: invert so bone/tissue looks as usual
        image = 255 - image
    return _array_to_rgb(image)


def _gunzip_head(data: bytes, n: int) -> bytes:
    """The first `n` bytes a gzip stream inflates to (b"" if it is not one); nothing more is decompressed."""
    import gzip
    import zlib

    try:
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _load_nifti(
    data: bytes, name: str, slice_index: int | None, max_pixels: int, max_bytes: int
) -> Image.Image:
    """One axial slice of a NIfTI-1 volume (`.nii` or `.nii.gz`), the volume refused from its header if too large.

    The 348-byte header is read first (through gzip for `.nii.gz`, so nothing more is decompressed), then only the
    slice that is shown is read from the stream: a small `.nii.gz` that would inflate to gigabytes is refused before
    it is decompressed, and an accepted one never holds more than one slice in memory.
    """
    import gzip

    import nibabel as nib

    try:
        stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(stream.read(348)))  # the header only
        shape = tuple(int(n) for n in header.get_data_shape())
        if len(shape) < 2:
            raise ImageLoadError(f"{name}: cannot display a NIfTI volume of shape {shape}")
        _check_pixels(shape[0] * shape[1], name, max_pixels)
        n_bytes = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
        _check_decoded_bytes(n_bytes, "voxel data", name, max_bytes)
        n = shape[2] if len(shape) > 2 else 1
        index = n // 2 if slice_index is None else slice_index
        if not 0 <= index < n:
            raise ImageLoadError(f"{name}: slice {slice_index} requested but the volume has {n} axial slices")
        stream.seek(0)
        volume = nib.Nifti1Image.from_stream(stream)
        # (x, y) of axial slice `index` of the first volume (4D: fMRI, multi-echo)
        where = (slice(None), slice(None), index, *[0] * (len(shape) - 3))[: len(shape)]
        array = np.asanyarray(volume.dataobj[where])
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - nibabel, gzip and zlib raise many types
        raise ImageLoadError(f"{name}: not a readable NIfTI volume ({type(e).__name__}: {e})") from None
    # NIfTI stores (x, y) with x to the patient's left in RAS; rotate for a conventional radiological display.
    return _array_to_rgb(to_uint8(np.rot90(array)))


def load_image(
    src,
    frame: int | None = None,
    slice_index: int | None = None,
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """Load any supported image (path, bytes, file object or PIL image) as an RGB PIL image.

    `frame` picks a frame of a multi-frame DICOM (default: the middle one); `slice_index` an axial slice of a
    NIfTI volume (default: the middle one). Every limit is checked here, from the header, before pixels are
    decoded: `max_pixels` per picture/frame/slice (default `MAX_IMAGE_PIXELS`) and `max_decoded_bytes` for all
    the pixel data a DICOM or NIfTI file declares (default `MAX_DECODED_BYTES`); over either, `ImageTooLargeError`.
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_decoded_bytes = MAX_DECODED_BYTES if max_decoded_bytes is None else max_decoded_bytes
    if isinstance(src, Image.Image):
        _check_pixels(src.width * src.height, "<PIL image>", max_pixels)
        return src.convert("RGB") if src.mode != "RGB" else src
    name = _name(src)
    data = _read_bytes(src)
    try:
        if is_dicom(data, name):
            return _load_dicom(data, name, frame, max_pixels, max_decoded_bytes)
        if is_nifti(data, name) or (data[:2] == b"\x1f\x8b" and is_nifti(_gunzip_head(data, 348))):
            return _load_nifti(data, name, slice_index, max_pixels, max_decoded_bytes)
        return _load_pil(data, name, max_pixels)
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file can make pydicom or Pillow raise almost anything
        # the type only: the message of a DICOM error can quote header values
        raise ImageLoadError(f"{name}: damaged or unsupported image ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------------------------
# Messages -> model inputs
# ---------------------------------------------------------------------------------------------------------------


def count_image_placeholders(messages: Sequence[dict]) -> int:
    return sum(
        1
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") == "image"
    )


def check_example(example: dict) -> None:
    images, messages = example.get("images") or [], example.get("messages")
    if not messages:
        raise ValueError("example has no messages")
    n = count_image_placeholders(messages)
    if n != len(images):
        raise ValueError(f"{n} image placeholder(s) in the messages but {len(images)} image(s) given")


def render(processor, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode(
    processor,
    examples: Sequence[dict],
    add_generation_prompt: bool = True,
    padding_side: str = "left",
    images_loaded: bool = False,
):
    """Tokenise a batch of {"images": [...], "messages": [...]} examples; images may be paths or PIL images.

    Returns the LlavaProcessor BatchFeature (input_ids, attention_mask, pixel_values). Never truncates: image
    tokens must match the vision features exactly.
    """
    texts, images, n_images = [], [], []
    for example in examples:
        check_example(example)
        # message text never becomes control tokens: a user cannot forge a turn (medllava.safe_text)
        texts.append(
            render(processor, mark_control_text(processor, example["messages"]), add_generation_prompt)
        )
        row_images = example.get("images") or []
        n_images.append(len(row_images))
        images.extend(im if images_loaded else load_image(im) for im in row_images)
    keeps = [tokens_per_image(processor, n) for n in n_images]
    processor.tokenizer.padding_side = padding_side
    batch = processor(
        text=texts, images=images or None, padding=True, return_tensors="pt", sanitize_control_tokens=True
    )
    full = image_token_count(processor)
    if any(keep < full for keep in keeps):
        batch["input_ids"], batch["attention_mask"] = shrink_rows(
            batch["input_ids"],
            batch["attention_mask"],
            processor.tokenizer.convert_tokens_to_ids(processor.image_token),
            full,
            keeps,
            processor.tokenizer.pad_token_id,
            padding_side,
        )
    return batch


def tokens_per_image(processor, n_images: int) -> int:
    """Image tokens each of a row's n_images images is given under the processor's token budget
    (`processor.image_token_budget` if set, else medllava.token_budget.DEFAULT_BUDGET): all of them within the
    budget, else a pooled square grid (medllava.token_budget). Models that keep the CLS token ("full" strategy)
    or have a non-square patch grid are never pooled."""
    full = image_token_count(processor)
    side = math.isqrt(full)
    if processor.vision_feature_select_strategy != "default" or side * side != full:
        return full
    budget = getattr(processor, "image_token_budget", None) or DEFAULT_BUDGET
    return pooled_side(n_images, side, budget) ** 2


def assistant_spans(input_ids: Sequence[int], tokenizer) -> list[tuple[int, int]]:
    """[start, end) token spans of assistant replies, each including its closing <|im_end|>.

    Found from token ids of the ChatML header `<|im_start|>assistant\\n`, so it is independent of the text.
    """
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, spans, i, h = list(input_ids), [], 0, len(header)
    while i <= len(ids) - h:
        if ids[i : i + h] == header:
            start = i + h
            end = start
            while end < len(ids) and ids[end] != end_id:
                end += 1
            end = min(end + 1, len(ids))  # learn to emit <|im_end|> too
            spans.append((start, end))
            i = end
        else:
            i += 1
    return spans


class TooLongError(ValueError):
    """A sample is longer than the limit; image tokens are never truncated, so it cannot be cut."""


class AssistantOnlyCollator:
    """Training collator: loss on assistant tokens only, for multi-turn image conversations.

    TRL's SFTTrainer refuses `assistant_only_loss` for image models and otherwise labels every token (user turns
    and image placeholders included), so this is ours. Rows longer than `max_length` tokens are never cut (cutting
    would drop image tokens and break the image-feature count): they raise `TooLongError`, or are dropped and
    counted in `self.dropped` with `drop_long=True`. Filter long rows before training (see `count_tokens`).
    """

    def __init__(self, processor, max_length: int | None = None, drop_long: bool = False):
        self.processor = processor
        self.max_length = max_length
        self.drop_long = drop_long
        self.dropped = 0

    def __call__(self, examples: list[dict]) -> dict:
        if self.max_length is not None:
            kept = []
            for example in examples:
                n = count_tokens(self.processor, example)
                if n <= self.max_length:
                    kept.append(example)
                elif self.drop_long:
                    self.dropped += 1
                else:
                    raise TooLongError(
                        f"sample {example.get('id', '?')} has {n} tokens > max_length {self.max_length}; "
                        "image tokens are never truncated: raise max_length or filter the data"
                    )
            if not kept:
                raise TooLongError(f"every sample in the batch is over max_length {self.max_length}")
            examples = kept
        batch = encode(self.processor, examples, add_generation_prompt=False, padding_side="right")
        labels = torch.full_like(batch["input_ids"], -100)
        for row, ids in enumerate(batch["input_ids"].tolist()):
            for start, end in assistant_spans(ids, self.processor.tokenizer):
                labels[row, start:end] = batch["input_ids"][row, start:end]
        labels[
            batch["attention_mask"] == 0
        ] = -100  # padding (pad id may equal a real token id: use the mask)
        batch["labels"] = labels
        return dict(batch)


def count_tokens(processor, example: dict) -> int:
    """Number of tokens of a full conversation after image expansion (no pixels are processed)."""
    text = render(processor, mark_control_text(processor, example["messages"]), add_generation_prompt=False)
    n_images = count_image_placeholders(example["messages"])
    ids = processor.tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
    return len(ids) + n_images * (tokens_per_image(processor, n_images) - 1)


def image_token_count(processor) -> int:
    """How many `<image>` tokens one image expands to with this processor."""
    size = processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    crop = getattr(processor.image_processor, "crop_size", None)
    if getattr(processor.image_processor, "do_center_crop", False) and crop:
        height, width = crop["height"], crop["width"]
    n = (height // processor.patch_size) * (
        width // processor.patch_size
    ) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n
