"""CT/MRI volumes: DICOM series sorted by position, NIfTI, CT windows, orientation, and every refusal."""

from __future__ import annotations

import gzip
import io
import json
import random
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medllava import volumes
from medllava.volumes import (
    MixedSeriesError,
    VolumeError,
    VolumeGeometryError,
    VolumeLimits,
    VolumeTooLargeError,
    load_volume,
    volume_slices,
)

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-5550123"
DZ, DY, DX = 2.5, 0.8, 0.8
SITE = Path(pydicom.__file__).resolve().parents[1]
PYDICOM_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def phantom(nz: int = 12, ny: int = 24, nx: int = 20) -> np.ndarray:
    """HU volume W[z, y, x] on the patient LPS grid: z up (superior), y back (posterior), x to the patient's left."""
    w = np.full((nz, ny, nx), -1000, dtype=np.int16)  # air
    w[:, 4:22, 3:18] = 40  # soft tissue
    w[:, 8:18, 4:9] = -800  # a lung on the patient's right
    w[:, 19:22, 8:12] = 1000  # spine: posterior, middle
    w[-3:, 0:3, 0:3] = 1500  # marker: superior, anterior, patient's right
    for z in range(nz):
        w[z, 12:16, 12:16] = 10 * z  # each slice says where it is
    return w


def write_series(
    folder: Path,
    w: np.ndarray,
    *,
    flipped: bool = False,
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    edit=None,
) -> list[Path]:
    """One single-frame DICOM file per z of `w`, written in shuffled order under random names.

    `flipped` stores the same anatomy with rows/columns running the other way (orientation -x, -y) and the files
    from top to bottom; `edit(z, ds)` changes a header before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = w.shape
    series_uid = series_uid or generate_uid()
    rng = random.Random(series_uid)
    order = list(range(nz))
    rng.shuffle(order)
    paths = []
    for rank, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.3.4"
        ds.SeriesDescription = "CHEST 2.5mm"
        ds.InstanceNumber = rank + 1  # unrelated to the position on purpose
        plane = w[z]
        if flipped:
            ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
            ds.ImagePositionPatient = [(nx - 1) * DX, (ny - 1) * DY, z * DZ]
            plane = plane[::-1, ::-1]
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, z * DZ]
        ds.PixelSpacing, ds.SliceThickness = [DY, DX], DZ
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((plane.astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        if edit is not None:
            edit(z, ds)
        path = folder / f"img_{rng.randrange(10**8):08d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti(path: Path, w: np.ndarray, gz: bool = True, affine: np.ndarray | None = None) -> Path:
    """The same anatomy as NIfTI: voxel axes i, j, k along LPS x, y, z, i.e. RAS affine diag(-dx, -dy, dz)."""
    data = np.transpose(w, (2, 1, 0)).astype(np.int16)  # [x, y, z]
    affine = np.diag([-DX, -DY, DZ, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def arrays(shown) -> list[np.ndarray]:
    return [np.asarray(image) for image in shown.images]


def window(hu: float, level: float, width: float) -> int:
    return int(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255 + 0.5)


# --- DICOM series ---------------------------------------------------------------------------------------------


def test_series_is_sorted_by_position_not_file_name_or_instance_number(tmp_path):
    w = phantom()
    write_series(tmp_path / "ct", w)
    shown = volume_slices(tmp_path / "ct", n_slices=12)
    assert shown.indices == list(range(12)) and shown.n_total == 12
    assert shown.positions_mm == [z * DZ for z in range(12)]
    assert shown.prompt_text == (
        "Slices (axial, inferior to superior, mm from the first): 0, 2.5, 5, 7.5, 10, 12.5, 15, 17.5, 20, 22.5, 25, 27.5"
    )
    # The marker region holds 10*z HU: through the soft-tissue window (G) it increases slice by slice.
    marker = [int(a[12:16, 12:16, 1].mean()) for a in arrays(shown)]
    assert marker == [window(10 * z, 40, 400) for z in range(12)]


def test_ct_windows_are_channels_of_rescaled_hounsfield_units(tmp_path):
    write_series(tmp_path / "ct", phantom(), slope=2.0, intercept=-2048.0)
    shown = volume_slices(tmp_path / "ct", n_slices=4)
    assert shown.channels == ["lung (W1500/L-600)", "soft_tissue (W400/L40)", "bone (W1800/L400)"]
    a = arrays(shown)[0]
    for (y, x), hu in {(10, 5): -800, (6, 14): 40, (20, 10): 1000, (1, 19): -1000}.items():
        expected = [window(hu, *volumes.CT_WINDOWS[name]) for name in ("lung", "soft_tissue", "bone")]
        assert np.abs(a[y, x].astype(int) - expected).max() <= 1, (hu, a[y, x], expected)
    gray = volume_slices(tmp_path / "ct", n_slices=1, windows=("bone",))
    g = arrays(gray)[0]
    assert gray.channels == ["bone (W1800/L400)"] and np.array_equal(g[..., 0], g[..., 2])
    custom = arrays(volume_slices(tmp_path / "ct", n_slices=1, windows=(0, 100)))[0]
    assert abs(int(custom[6, 14, 0]) - window(40, 0, 100)) <= 1


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_same_anatomy_renders_the_same_from_any_storage_order_or_format(tmp_path, axis):
    """DICOM with rows/columns either way round and files either order, and NIfTI, give identical slices."""
    w = phantom()
    write_series(tmp_path / "a", w)
    write_series(tmp_path / "b", w, flipped=True)
    nifti = write_nifti(tmp_path / "c.nii.gz", w)
    a, b, c = (volume_slices(src, n_slices=5, axis=axis) for src in (tmp_path / "a", tmp_path / "b", nifti))
    assert c.modality == "CT"  # found from the intensities (air at -1000 HU)
    assert a.positions_mm == b.positions_mm == c.positions_mm and a.indices == b.indices == c.indices
    for x, y, z in zip(arrays(a), arrays(b), arrays(c), strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    # The marker sits superior, anterior, on the patient's right: in the last axial slice (slices go inferior to
    # superior), the first coronal (anterior to posterior) and the first sagittal (right to left), and top-left in
    # each plane's convention (axial: anterior up, right on the left; coronal, sagittal: superior up, right /
    # anterior on the left). Bone window (B): the 1500 HU marker is white, air black.
    with_marker = arrays(a)[-1 if axis == "axial" else 0]
    assert with_marker[0, 0, 2] == 255 and with_marker[-1, -1, 2] == 0
    without = arrays(a)[0 if axis == "axial" else -1]
    assert without[0, 0, 2] == 0


def test_reformatted_planes_have_square_pixels(tmp_path):
    w = phantom()
    write_series(tmp_path / "ct", w)
    shown = volume_slices(tmp_path / "ct", n_slices=3, axis="coronal")
    image = shown.images[0]
    assert (image.width, image.height) == (20, 38)  # 12 slices of 2.5 mm at 0.8 mm pixels
    assert shown.pixel_spacing_mm == (pytest.approx(DZ * 12 / image.height, abs=1e-3), DX)
    assert shown.spacing_mm == DY and shown.direction == "anterior to posterior"
    assert max(volume_slices(tmp_path / "ct", n_slices=1, axis="coronal", max_side=16).images[0].size) == 16


def test_zip_and_list_of_files_give_the_same_volume(tmp_path):
    paths = write_series(tmp_path / "ct", phantom())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in paths:
            zf.write(p, f"series/{p.name}")
        zf.writestr("series/README.txt", "not a DICOM file")
    reference = arrays(volume_slices(tmp_path / "ct", n_slices=4))
    from_zip = load_volume(buffer.getvalue(), name="upload.zip")
    assert from_zip.metadata()["files_skipped"] == 1
    assert all(np.array_equal(x, y) for x, y in zip(reference, arrays(from_zip.slices(4)), strict=True))
    pairs = [(p.name, p.read_bytes()) for p in paths]
    assert all(np.array_equal(x, y) for x, y in zip(reference, arrays(volume_slices(pairs, 4)), strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(reference, arrays(volume_slices(paths, 4)), strict=True))


def test_missing_slices_are_refused_or_reported_with_allow_gaps(tmp_path):
    paths = write_series(tmp_path / "ct", phantom())
    z5 = next(
        p
        for p in paths
        if float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) == 5 * DZ
    )
    z5.unlink()
    with pytest.raises(VolumeGeometryError, match=r"slices are missing.*1 gap\(s\): 5 mm after .*allow_gaps"):
        load_volume(tmp_path / "ct")
    volume = load_volume(tmp_path / "ct", allow_gaps=True)
    shown = volume.slices(n_slices=11)
    assert shown.gaps == [{"after_index": 4, "step_mm": 5.0, "missing": 1}]
    assert shown.positions_mm == [0, 2.5, 5, 7.5, 10, 15, 17.5, 20, 22.5, 25, 27.5]  # honest positions
    with pytest.raises(VolumeGeometryError, match="cannot be resliced"):
        volume.slices(axis="coronal")


def test_gantry_tilt_and_sheared_stacks_are_refused(tmp_path):
    def tilt(z, ds):
        ds.GantryDetectorTilt = 15

    write_series(tmp_path / "tilt", phantom(), edit=tilt)
    with pytest.raises(VolumeGeometryError, match="gantry tilt of 15 degrees"):
        load_volume(tmp_path / "tilt")

    def shear(z, ds):  # each slice moved 1 mm back per 2.5 mm up: a 21.8 degree tilt without the tag
        ds.ImagePositionPatient = [0.0, z * 1.0, z * DZ]

    write_series(tmp_path / "shear", phantom(), edit=shear)
    with pytest.raises(
        VolumeGeometryError, match=r"not stacked along their normal \(sheared by 21.8 degrees"
    ):
        load_volume(tmp_path / "shear")


def test_mixed_series_list_them_and_one_can_be_picked(tmp_path):
    write_series(tmp_path / "mixed", phantom(nz=6), series_uid="1.2.826.0.1.1")
    write_series(tmp_path / "mixed", phantom(nz=4), series_uid="1.2.826.0.1.2", modality="CT")
    with pytest.raises(MixedSeriesError, match="2 DICOM series") as info:
        load_volume(tmp_path / "mixed")
    assert {s["series_uid"]: s["files"] for s in info.value.series} == {
        "1.2.826.0.1.1": 6,
        "1.2.826.0.1.2": 4,
    }
    assert "1.2.826.0.1.1 (6 files, CT, 'CHEST 2.5mm')" in str(info.value)
    assert load_volume(tmp_path / "mixed", series_uid="1.2.826.0.1.2").n_slices("axial") == 4
    with pytest.raises(MixedSeriesError, match="not among"):
        load_volume(tmp_path / "mixed", series_uid="9.9")


@pytest.mark.parametrize(
    "tag, value, message",
    [
        ("PixelSpacing", [0.9, 0.8], "PixelSpacing .* differs"),
        ("ImageOrientationPatient", [1, 0, 0, 0, 0.995, 0.0998], "ImageOrientationPatient .* differs"),
        ("ImagePositionPatient", [0.0, 0.0, 2 * DZ], "at the same position"),
        ("ImagePositionPatient", [0.0, 0.0, 3.4 * DZ], "irregular slice spacing"),
    ],
)
def test_inconsistent_slices_are_refused(tmp_path, tag, value, message):
    def edit(z, ds):
        if z == 3:
            setattr(ds, tag, value)

    write_series(tmp_path / "ct", phantom(), edit=edit)
    with pytest.raises(VolumeGeometryError, match=message):
        load_volume(tmp_path / "ct")


def test_slices_of_different_size_are_refused(tmp_path):
    write_series(tmp_path / "ct", phantom())
    write_series(tmp_path / "other", phantom(ny=20), series_uid=None)
    odd = next((tmp_path / "other").iterdir())
    ds = pydicom.dcmread(odd)
    ds.SeriesInstanceUID = pydicom.dcmread(next((tmp_path / "ct").iterdir())).SeriesInstanceUID
    ds.ImagePositionPatient = [0.0, 0.0, 12 * DZ]
    ds.save_as(tmp_path / "ct" / "odd.dcm")
    with pytest.raises(VolumeGeometryError, match=r"slice size 20x20 differs from 24x20"):
        load_volume(tmp_path / "ct")


def test_limits_are_checked_from_headers_before_pixel_data(tmp_path, monkeypatch):
    write_series(tmp_path / "ct", phantom())

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel data was read")

    monkeypatch.setattr(volumes, "_dicom_pixels", no_pixels)
    for limits, message in [
        (VolumeLimits(max_slices=11), "12 slices, over the limit of 11"),
        (VolumeLimits(max_voxels=5000), "5,760 voxels is over the limit of 5,000"),
        (VolumeLimits(max_slice_pixels=400), "24x20 pixels per slice is over"),
        (VolumeLimits(max_decoded_bytes=10_000), "declare 0.0 MiB of pixel data, over"),
        (VolumeLimits(max_files=5), "more than 5 files"),
        (VolumeLimits(max_bytes=10_000), "over the 0 MiB limit on a volume's files"),
    ]:
        with pytest.raises(VolumeTooLargeError, match=message):
            load_volume(tmp_path / "ct", limits=limits)
    assert load_volume(tmp_path / "ct").n_slices() == 12  # CT: nothing read until slices are rendered
    with pytest.raises(VolumeError, match="n_slices=17 is outside 1..16"):
        load_volume(tmp_path / "ct").slices(n_slices=17)


def test_zip_bomb_is_refused_from_its_directory(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 2_000_000)
    assert len(buffer.getvalue()) < 10_000
    with pytest.raises(VolumeTooLargeError, match="declares 1.9 MiB once extracted.*zip bomb"):
        load_volume(buffer.getvalue(), name="bomb.zip", limits=VolumeLimits(max_bytes=1_000_000))


def test_patient_identifiers_never_reach_errors_or_metadata(tmp_path):
    write_series(tmp_path / "ok", phantom())
    write_series(tmp_path / "mixed", phantom(nz=3))
    write_series(tmp_path / "mixed", phantom(nz=3))
    texts = [
        json.dumps(load_volume(tmp_path / "ok").metadata()),
        json.dumps(volume_slices(tmp_path / "ok").metadata()),
    ]
    with pytest.raises(MixedSeriesError) as info:
        load_volume(tmp_path / "mixed")
    texts += [str(info.value), json.dumps(info.value.series)]
    for text in texts:
        assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text


def test_not_a_volume(tmp_path):
    paths = write_series(tmp_path / "ct", phantom(nz=2))
    with pytest.raises(VolumeError, match="one DICOM slice .* is not a volume"):
        load_volume(paths[0])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(VolumeError, match=r"no DICOM image files found \(1 other file"):
        load_volume(tmp_path / "notes")
    with pytest.raises(VolumeError, match="no such file or folder"):
        load_volume(tmp_path / "missing")
    with pytest.raises(VolumeError, match="unknown axis"):
        load_volume(tmp_path / "ct").slices(axis="oblique")


# --- NIfTI ----------------------------------------------------------------------------------------------------


def test_nifti_mri_is_scaled_by_volume_percentiles(tmp_path):
    rng = np.random.default_rng(0)
    # Brighter slice after slice: one scale for the whole volume keeps that (a per-slice stretch would not).
    data = (rng.uniform(100, 200, size=(20, 24, 10)) + 50 * np.arange(10)).astype(np.float32)
    path = tmp_path / "t1.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), path)
    volume = load_volume(path)
    assert volume.modality == "MR" and volume.modality_source == "intensity"
    shown = volume.slices(n_slices=10)
    assert shown.channels == ["MR percentiles 1-99"] and shown.positions_mm == [3.0 * k for k in range(10)]
    means = [a.mean() for a in arrays(shown)]
    assert all(np.diff(means) > 10) and means[0] < 60 and means[-1] > 195
    with pytest.raises(VolumeError, match="CT windows apply to Hounsfield units"):
        volume.slices(windows=("lung",))
    as_ct = load_volume(path, modality="CT")
    assert as_ct.modality_source == "argument" and as_ct.slices(1).channels[0].startswith("lung")


def test_nifti_header_checks(tmp_path):
    w = phantom()
    sheared = np.diag([-DX, -DY, DZ, 1.0])
    sheared[1, 2] = 1.0  # k also moves along y
    with pytest.raises(VolumeGeometryError, match="sheared"):
        load_volume(write_nifti(tmp_path / "shear.nii.gz", w, affine=sheared))
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.int16), np.eye(4)), flat)
    with pytest.raises(VolumeError, match="not a 3D volume"):
        load_volume(flat)
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 6, 3), np.int16), np.eye(4)), four_d)
    assert load_volume(four_d).metadata()["volumes_in_file"] == 3
    with pytest.raises(VolumeError, match="not a NIfTI-1 or NIfTI-2 file"):
        load_volume(gzip.compress(b"hello" * 200), name="x.nii.gz")


def test_nifti_bomb_is_refused_from_its_header_before_decompressing(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 1024))
    header.set_data_dtype(np.float32)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 1_000_000  # the rest would be 16 GiB
    data = gzip.compress(raw)
    with pytest.raises(VolumeTooLargeError, match=r"over the limit of 1,024|voxels is over"):
        load_volume(data, name="bomb.nii.gz")
    with pytest.raises(VolumeTooLargeError, match="declares 16,384.0 MiB of voxel data"):
        load_volume(data, name="bomb.nii.gz", limits=VolumeLimits(max_voxels=2**40, max_slice_pixels=2**40))


# --- real volumes from PyPI packages (pydicom's test series, nibabel's and nilearn's brains) --------------------


def test_real_ct_series_from_pydicom_sorts_against_instance_numbers():
    folder = PYDICOM_SERIES / "98892001" / "CT5N"
    headers = sorted(
        (pydicom.dcmread(p) for p in folder.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    assert [int(ds.InstanceNumber) for ds in headers] == [10, 9, 8, 7, 6]  # position runs against the numbers
    shown = volume_slices(folder, n_slices=5, windows=("soft_tissue",))
    assert shown.modality == "CT" and shown.positions_mm == [0, 2.5, 5, 7.5, 10]
    for ds, image in zip(headers, arrays(shown), strict=True):
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = np.clip((hu - (40 - 200)) / 400, 0, 1) * 255
        assert np.abs(image[..., 0].astype(float) - expected).max() <= 1


def test_real_broken_series_from_pydicom_are_refused():
    with pytest.raises(VolumeGeometryError, match="202.5 mm after"):
        load_volume(PYDICOM_SERIES / "77654033" / "CT2")  # 4 slices, one of them 200 mm away
    with pytest.raises(VolumeGeometryError, match="ImageOrientationPatient .* differs"):
        load_volume(PYDICOM_SERIES / "98892003" / "MR700")  # projections at different angles
    with pytest.raises(MixedSeriesError, match="3 DICOM series"):
        load_volume(PYDICOM_SERIES / "98892003" / "MR2")


def test_real_nifti_brains():
    anatomical = SITE / "nibabel" / "tests" / "data" / "anatomical.nii"
    volume = load_volume(anatomical)
    assert volume.modality == "MR" and volume.metadata()["shape"] == {
        "axial": 25,
        "coronal": 41,
        "sagittal": 33,
    }
    assert [im.size for im in volume.slices(2, axis="sagittal").images] == [(41, 25)] * 2
    mni = SITE / "nilearn" / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not mni.is_file():
        pytest.skip("nilearn (the data extra) is not installed")
    shown = volume_slices(mni, n_slices=3, axis="sagittal")
    middle = np.asarray(shown.images[1])[..., 0]
    # Midline sagittal T1: superior up, anterior on the left. The brain fills the upper part, the neck region
    # below it is narrower.
    assert middle.shape == (189, 233) and middle[:20].mean() < middle[40:120].mean()
    assert shown.prompt_text.startswith("Slices (sagittal, right to left, mm from the first): 0, ")
