"""Image loading (common formats, DICOM, NIfTI), bad-input guards, and the assistant-only label mask."""

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import random_image
from PIL import Image

from medllava import processing
from medllava.processing import AssistantOnlyCollator, ImageLoadError, TooLongError, dicom_summary, load_image


def dicom_file(name: str) -> Path:
    """A real DICOM test file from pydicom or pydicom-data (both installed by `make setup`)."""
    import importlib.util

    for root in (
        Path(pydicom.__file__).parent / "data" / "test_files",
        Path(importlib.util.find_spec("data_store").origin).parent / "data",
    ):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(name)


# --- common formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_common_formats_load_as_rgb(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    random_image(size=(40, 30)).save(path, format=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_16bit_grayscale_png_uses_full_range(tmp_path):
    ramp = (np.arange(64 * 32).reshape(32, 64) * 20 + 1000).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    array = np.asarray(load_image(path))
    assert array.shape == (32, 64, 3) and array.min() == 0 and array.max() == 255
    assert np.all(np.diff(array[:, :, 0].astype(int).ravel()) >= 0)  # monotone ramp stays monotone


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.new("L", (10, 10), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (10, 10), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "g.png").getpixel((0, 0)) == (7, 7, 7)
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (0, 0, 0)  # transparent over black


def test_bytes_and_file_objects_load(tmp_path):
    buffer = io.BytesIO()
    random_image().save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (64, 48)
    buffer.seek(0)
    assert load_image(buffer).size == (64, 48)


# --- DICOM ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, modality",
    [
        ("CT_small.dcm", "CT"),
        ("MR_small.dcm", "MR"),
        ("US1_UNCR.dcm", "US"),
        ("JPEG2000_UNC.dcm", "NM"),
        ("examples_palette.dcm", "US"),
        ("MR_small_RLE.dcm", "MR"),
        ("SC_rgb_jpeg_dcmtk.dcm", "OT"),
    ],
)
def test_real_dicom_files_load(name, modality):
    path = dicom_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.Modality == modality
    image = load_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB" and image.size == (ds.Columns, ds.Rows)
    assert array.std() > 5  # real content, not a blank frame


def test_ct_uses_rescale_and_window_from_tags():
    path = dicom_file("693_UNCR.dcm")  # CT, rescale intercept -1024, window 40/100
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    centre, width = processing.dicom_window(ds)
    assert (centre, width) == (
        float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter),
        float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth),
    )
    expected = np.clip((hu - (centre - width / 2)) * 255.0 / width, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(path))[:, :, 0], expected)


def test_monochrome1_is_inverted():
    path = dicom_file("RG3_UNCR.dcm")  # chest CR stored as MONOCHROME1
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(float)
    shown = np.asarray(load_image(path))[:, :, 0].astype(float)
    assert np.corrcoef(raw.ravel()[::97], shown.ravel()[::97])[0, 1] < -0.5


def test_multiframe_takes_middle_frame_unless_asked():
    path = dicom_file("emri_small.dcm")  # 10 frames
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    middle, first = load_image(path), load_image(path, frame=0)
    assert np.corrcoef(np.asarray(middle)[:, :, 0].ravel(), frames[5].ravel())[0, 1] > 0.99
    assert np.corrcoef(np.asarray(first)[:, :, 0].ravel(), frames[0].ravel())[0, 1] > 0.99
    with pytest.raises(ImageLoadError, match="frame 10 requested but the file has 10 frame"):
        load_image(path, frame=10)


def test_compressed_dicom_decodes_or_names_the_plugin():
    image = load_image(dicom_file("MR_small_jp2klossless.dcm"))  # JPEG 2000: Pillow's openjpeg decodes it
    assert image.size == (64, 64)
    with pytest.raises(ImageLoadError, match=r"JPEG-LS.*install pylibjpeg"):
        load_image(dicom_file("MR_small_jpeg_ls_lossless.dcm"))


def test_dicom_identifiers_never_reach_errors_logs_or_summary(tmp_path, caplog, capsys):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.PatientName = "Doe^Secret"
    ds.PatientID = "PID-998877"
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data -> decoding error
    path = tmp_path / "phi.dcm"
    ds.save_as(path)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    summary = dicom_summary(ds)
    seen = str(err.value) + caplog.text + str(capsys.readouterr()) + repr(summary)
    assert "Secret" not in seen and "998877" not in seen
    assert summary["Modality"] == "CT" and "PatientName" not in summary


# --- NIfTI ---------------------------------------------------------------------------------------------------


def test_nifti_volume_middle_or_chosen_slice(tmp_path):
    import nibabel as nib

    volume = np.zeros((20, 30, 9), dtype=np.float32)
    for z in range(9):
        volume[2:10, 3:12, z] = z + 1
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    middle = np.asarray(load_image(path))
    assert middle.shape == (30, 20, 3)  # rotated for radiological display
    assert middle.max() == 255
    with pytest.raises(ImageLoadError, match="slice 9 requested but the volume has 9"):
        load_image(path, slice_index=9)
    assert np.asarray(load_image(path, slice_index=0)).max() == 255


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="notes.txt: unknown or unsupported image format"):
        load_image(path)


def test_corrupt_truncated_png(tmp_path):
    buffer = io.BytesIO()
    random_image(size=(200, 200)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.png: corrupt or truncated"):
        load_image(path)


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 10_000)
    random_image(size=(200, 200)).save(tmp_path / "big.png")
    with pytest.raises(
        ImageLoadError, match=r"big.png: .*over the 10,000 pixel limit \(possible decompression"
    ):
        load_image(tmp_path / "big.png")
    random_image(size=(100, 120)).save(tmp_path / "bigger.png")  # between the limit and PIL's own 2x error
    with pytest.raises(ImageLoadError, match=r"bigger.png: .*over the 10,000 pixel limit"):
        load_image(tmp_path / "bigger.png")


def test_empty_and_not_dicom(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(ImageLoadError, match="fake.dcm"):
        load_image(tmp_path / "fake.dcm")


# --- training labels -----------------------------------------------------------------------------------------


def _conversation():
    return {
        "id": "c1",
        "images": [random_image()],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What modality is this?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A CT scan."}]},
            {"role": "user", "content": [{"type": "text", "text": "Which side is the lesion on?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The left side."}]},
        ],
    }


def test_assistant_only_labels_are_exactly_the_assistant_spans(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    short = {"images": [random_image(1)], "messages": _conversation()["messages"][:2]}
    batch = AssistantOnlyCollator(processor)([_conversation(), short])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == ids.shape and mask[1].sum() < mask[0].sum()  # right padded
    for row, answers in (
        (0, ["A CT scan.<|im_end|>", "The left side.<|im_end|>"]),
        (1, ["A CT scan.<|im_end|>"]),
    ):
        kept = labels[row][labels[row] != -100]
        assert tok.decode(kept) == "".join(answers)
        # every unmasked position holds its own token, and no image, user or system token is unmasked
        positions = (labels[row] != -100).nonzero().ravel()
        assert (labels[row, positions] == ids[row, positions]).all()
        assert not (ids[row, positions] == processor.tokenizer.convert_tokens_to_ids("<image>")).any()
    assert (labels[1][mask[1] == 0] == -100).all()


def test_over_long_samples_are_never_truncated(tiny):
    _, processor = tiny
    with pytest.raises(TooLongError, match="image tokens are never truncated"):
        AssistantOnlyCollator(processor, max_length=20)([_conversation()])
    collator = AssistantOnlyCollator(
        processor, max_length=processing.count_tokens(processor, _conversation()), drop_long=True
    )
    long = _conversation()
    long["messages"][3]["content"][0]["text"] = "very " * 50 + "long"
    batch = collator([_conversation(), long])
    assert batch["input_ids"].shape[0] == 1 and collator.dropped == 1
    assert batch["input_ids"].shape[1] == processing.count_tokens(processor, _conversation())
