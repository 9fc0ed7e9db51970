"""Inputs beyond one picture, served: prior and current studies, CT/MRI volumes and spoken questions.

One live server (chat + API, tiny random model) whose engine records what reaches the model: the images and the
messages of every `respond` call. Volumes are built in the test (a NIfTI with nibabel, a DICOM series with
pydicom, with a patient's name and ID in every header) and checked against `medllava.volumes` called directly.
The spoken question is tests/fixtures/speech_question.webm (a browser-like WebM/Opus recording).
"""

from __future__ import annotations

import copy
import gzip
import io
import threading
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import openai
import pydicom
import pytest
from conftest import random_image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_serve import data_url, png_bytes, post, start_server, still_serving

from medllava.image_roles import ImageInput, describe_images
from medllava.speech import word_error_rate
from medllava.volumes import volume_slices
from serve.app import build_app
from serve.engine import Engine, Limits

MODEL = "medllava"
LIMITS = Limits(
    concurrency=1,
    max_queue=8,
    max_new_tokens=64,
    default_new_tokens=4,
    max_images=12,
    max_image_bytes=300_000,
    max_image_pixels=1_000_000,
    max_decoded_bytes=8 * 2**20,
    max_messages=12,
    max_prompt_tokens=900,
)
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-5550123"
SPEECH = Path(__file__).parent / "fixtures" / "speech_question.webm"
SPOKEN = "Has the lesion in the right lung grown since the prior study?"
SAMPLED = (1.0, 1.0, 6, 7)  # temperature, top-p, max new tokens, seed


class RecordingEngine(Engine):
    """An engine that keeps the images and messages of every conversation it answers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list, list[dict]]] = []

    def respond(self, images, messages, params, **kwargs):
        self.calls.append((list(images), copy.deepcopy(list(messages))))
        return super().respond(images, messages, params, **kwargs)


@pytest.fixture(scope="module")
def live(tiny):
    engine = RecordingEngine(*tiny, model_id=MODEL, limits=LIMITS)
    server, thread, url = start_server(build_app(engine))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def chat(live):
    from gradio_client import Client

    return Client(live[0] + "/", verbose=False)


# ---------------------------------------------------------------------------------------------------------------
# Small volumes, built here
# ---------------------------------------------------------------------------------------------------------------


def hu_volume(nz: int = 10, ny: int = 20, nx: int = 16) -> np.ndarray:
    """W[z, y, x] in HU: air around a soft-tissue body whose brightness grows with z, and a bone marker."""
    w = np.full((nz, ny, nx), -1000, dtype=np.int16)
    for z in range(nz):
        w[z, 3:17, 2:14] = 20 + 15 * z
    w[:, 14:17, 6:9] = 900
    return w


def dicom_series(w: np.ndarray, series_uid: str | None = None, dz: float = 2.5) -> list[tuple[str, bytes]]:
    """One CT DICOM file per slice (a patient's name and ID in each header), named after the patient."""
    series_uid = series_uid or generate_uid()
    files = []
    for z, plane in enumerate(w):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19610203"
        ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.3.4"
        ds.InstanceNumber = len(w) - z
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, z * dz]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], dz
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = plane.astype("<i2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"Doe_Jane_{z:03d}.dcm", buffer.getvalue()))
    return files


def zip_of(files: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, (name, data) in enumerate(files):
            zf.writestr(f"Doe_Jane/{k:03d}_{name}", data)
    return buffer.getvalue()


def nifti_gz(w: np.ndarray) -> bytes:
    """The same anatomy as a .nii.gz: voxel axes x, y, z (RAS affine diag(-0.8, -0.8, 2.5))."""
    data = np.ascontiguousarray(np.transpose(w, (2, 1, 0)))
    return gzip.compress(nib.Nifti1Image(data, np.diag([-0.8, -0.8, 2.5, 1.0])).to_bytes(), mtime=0)


def volume_part(data: bytes, mime: str = "application/zip", **extra) -> dict:
    return {"type": "volume_url", "volume_url": {"url": data_url(data, mime), **extra}}


def image_part(data: bytes, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data), **extra}}


def ask(text: str, *parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def same_pixels(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# ---------------------------------------------------------------------------------------------------------------
# API: prior and current studies, volumes
# ---------------------------------------------------------------------------------------------------------------


def test_prior_and_current_reach_the_model_as_two_images_with_the_role_text(live, client):
    _, engine = live
    prior, current = png_bytes(1), png_bytes(2)
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=4,
        messages=ask(
            "Has the lesion grown?",
            image_part(prior, role="prior", date="2025-03-01"),
            image_part(current, role="current"),
        ),
    )
    assert reply.choices[0].message.role == "assistant"
    images, messages = engine.calls[-1]
    assert len(images) == 2
    assert same_pixels(images[0], random_image(1)) and same_pixels(images[1], random_image(2))
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {
                    "type": "text",
                    "text": "Image 1: prior study (2025-03-01). Image 2: current study.\nHas the lesion grown?",
                },
            ],
        }
    ]
    # without roles the text is the question alone, as before
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=ask("Compare.", image_part(prior)))
    assert engine.calls[-1][1][0]["content"][-1] == {"type": "text", "text": "Compare."}


def test_images_are_numbered_through_the_conversation(live, client):
    _, engine = live
    messages = [
        *ask("What is this?", image_part(png_bytes(3))),
        {"role": "assistant", "content": "A radiograph."},
        {"role": "user", "content": [image_part(png_bytes(4), role="current", date="2025-06-30")]},
    ]
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=messages)
    images, sent = engine.calls[-1]
    assert len(images) == 2
    # no text after the image: the role line is a text part of its own, numbered after the first turn's image
    assert sent[-1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Image 2: current study (2025-06-30)."},
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"role": "baseline"}, "unknown image role 'baseline'"),
        ({"date": "1 March 2025"}, "YYYY-MM-DD"),
        ({"date": "2025-02-30"}, "not a calendar date"),
        ({"region": "chest"}, "unrecognised field 'region'"),
    ],
)
def test_bad_role_fields_are_400(live, extra, message):
    url, _ = live
    r = post(url, {"model": MODEL, "messages": ask("q", image_part(png_bytes(), **extra))})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("messages[0].content[0]")


def test_nifti_volume_through_the_api_becomes_slices_with_their_positions(live, client):
    _, engine = live
    nii = nifti_gz(hu_volume())
    expected = volume_slices(nii, n_slices=4, name="x.nii.gz")
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=ask(
            "On how many slices is the lesion visible?", volume_part(nii, "application/gzip", n_slices=4)
        ),
    )
    images, messages = engine.calls[-1]
    assert len(images) == 4 and all(same_pixels(a, b) for a, b in zip(images, expected.images, strict=True))
    text = messages[0]["content"][-1]["text"]
    assert messages[0]["content"][:4] == [{"type": "image"}] * 4
    assert text == (
        "Images 1-4: CT volume in lung, soft tissue and bone windows (red, green, blue). "
        f"{expected.prompt_text}.\nOn how many slices is the lesion visible?"
    )
    assert "Slices (axial, inferior to superior, mm from the first): 0, " in text
    assert reply.usage.prompt_tokens > 20


def test_dicom_zip_volume_with_a_prior_image_and_options(live, client):
    _, engine = live
    series = dicom_series(hu_volume())
    expected = volume_slices(series, n_slices=3, axis="coronal", windows=["bone"])
    client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=ask(
            "Has it changed?",
            image_part(png_bytes(5), role="prior", date="2024-12-24"),
            volume_part(zip_of(series), role="current", n_slices=3, axis="coronal", windows=["bone"]),
        ),
    )
    images, messages = engine.calls[-1]
    assert len(images) == 4 and same_pixels(images[0], random_image(5))
    assert all(same_pixels(a, b) for a, b in zip(images[1:], expected.images, strict=True))
    assert (
        messages[0]["content"][-1]["text"]
        == describe_images(
            [ImageInput(role="prior", date="2024-12-24"), ImageInput.from_volume(expected, role="current")]
        )
        + "\nHas it changed?"
    )
    assert (
        "Images 2-4: current study, CT volume in the bone window. Slices (coronal"
        in (messages[0]["content"][-1]["text"])
    )


def test_a_volume_without_n_slices_gets_the_room_left(live, client):
    _, engine = live
    client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=ask("q", *[image_part(png_bytes(k)) for k in range(6)], volume_part(nifti_gz(hu_volume()))),
    )
    assert len(engine.calls[-1][0]) == 12  # 6 images, then the 6 slices the limit of 12 leaves (default 8)


def _bomb_nifti(shape) -> bytes:
    """A .nii.gz of zeros: tiny compressed, large once decompressed."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + bytes(int(np.prod(shape)) * 2)
    return gzip.compress(raw, compresslevel=1)


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", bytes(60 * 2**20))  # 60 MiB of zeros, about 60 KB zipped
    return buffer.getvalue()


def test_over_limit_volumes_are_413(live, monkeypatch):
    url, engine = live
    # slices in the file, pixels per slice and decoded bytes: all from the header, nothing decompressed
    cases = {
        "1100 slices": (_bomb_nifti((8, 8, 1100)), "1100 slices is over the limit of 1024"),
        "pixels": (_bomb_nifti((1100, 1000, 2)), "over 1,000,000 pixels"),
        "decoded bytes": (_bomb_nifti((400, 400, 30)), "possible decompression bomb"),
        "zip bomb": (_zip_bomb(), "possible zip bomb"),
    }
    for name, (data, message) in cases.items():
        error = openai_error(
            post(url, {"model": MODEL, "messages": ask("q", volume_part(data))}), 413, "volume_too_large"
        )
        assert message in error["message"] and error["param"] == "messages[0].content[0]", (name, error)
    # stored bytes, from the data: URL's length before decoding it
    import serve.api

    monkeypatch.setattr(serve.api, "MAX_VOLUME_BYTES", 20_000)
    big = nifti_gz(np.random.default_rng(0).integers(-1000, 1000, (40, 40, 20), dtype=np.int16))
    error = openai_error(
        post(url, {"model": MODEL, "messages": ask("q", volume_part(big))}), 413, "volume_too_large"
    )
    assert "the limit is 0.0191 MiB" in error["message"]
    assert engine.pending == 0
    still_serving(url)


def test_bad_volumes_are_400(live):
    url, _ = live
    w = hu_volume()
    series = dicom_series(w)
    other = dicom_series(w[:4])
    two_series = zip_of(series[:5] + other)
    gap = zip_of(series[:4] + series[6:])
    uids = [pydicom.dcmread(io.BytesIO(files[0][1])).SeriesInstanceUID for files in (series, other)]
    cases = [
        (volume_part(two_series), 400, "invalid_volume", "2 DICOM series"),
        (volume_part(gap), 400, "invalid_volume", "slices are missing"),
        (volume_part(b"PK\x03\x04 not really a zip"), 400, "invalid_volume", "not a readable zip"),
        (volume_part(zip_of(series), n_slices=13), 400, "too_many_images", "more than 12 images"),
        (volume_part(zip_of(series), windows=["lung", "bone"]), 400, "invalid_content", "not 2"),
        (volume_part(zip_of(series), windows=["mediastinum"]), 400, "invalid_content", "unknown window"),
        (volume_part(zip_of(series), axis="oblique"), 400, "invalid_content", "unknown axis"),
        (volume_part(nifti_gz(w), modality="PET"), 400, "invalid_content", "'CT' or 'MR'"),
        (
            {"type": "volume_url", "volume_url": {"url": "https://example.org/ct.zip"}},
            400,
            "volume_url_not_allowed",
            "only data: URLs",
        ),
        (
            {"type": "image_url", "image_url": {"url": data_url(zip_of(series), "application/zip")}},
            400,
            "invalid_image",
            "volume_url",
        ),
    ]
    for part, status, code, message in cases:
        error = openai_error(post(url, {"model": MODEL, "messages": ask("q", part)}), status, code)
        assert message in error["message"], error
    mixed = post(url, {"model": MODEL, "messages": ask("q", volume_part(two_series))}).json()["error"][
        "message"
    ]
    assert "Doe" not in mixed and "series 1: 5 files, CT" in mixed
    assert not any(uid in mixed for uid in uids)  # a SeriesInstanceUID never comes back
    still_serving(url)


# ---------------------------------------------------------------------------------------------------------------
# The chat: prior/current slots, volumes in the question box, the slice scroller
# ---------------------------------------------------------------------------------------------------------------


def _files(tmp_path, files: list[tuple[str, bytes]]) -> list[str]:
    paths = []
    for name, data in files:
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def test_chat_prior_and_current_slots_match_the_api(live, chat, client, tmp_path):
    from gradio_client import handle_file

    _, engine = live
    prior, current = _files(
        tmp_path, [("Doe_Jane_prior.png", png_bytes(7)), ("Doe_Jane_now.png", png_bytes(8))]
    )
    box, history, preview, info = chat.predict(
        {"text": "Has the lesion grown?", "files": []},
        *SAMPLED,
        prior_files=[handle_file(prior)],
        prior_date="2025-03-01",
        current_files=[handle_file(current)],
        api_name="/chat",
    )
    images, messages = engine.calls[-1]
    assert (
        len(images) == 2
        and same_pixels(images[0], random_image(7))
        and same_pixels(images[1], random_image(8))
    )
    question = "Image 1: prior study (2025-03-01). Image 2: current study.\nHas the lesion grown?"
    assert messages[0]["content"][-1]["text"] == question
    # the chat shows which images the answer is about: the labelled previews, the line, the preview panel
    users = [m for m in history if m["role"] == "user"]
    assert [c.get("alt_text") for m in users for c in m["content"] if c.get("type") == "file"] == [
        "Image 1: prior study (2025-03-01)",
        "Image 2: current study",
    ]
    assert [c["text"] for m in users for c in m["content"] if c.get("type") == "text"] == [question]
    assert "Images the answers are about" in info and "Image 1: prior study (2025-03-01)" in info
    assert "Doe_Jane" not in str(history) + info and preview
    # the same conversation through the API gives the same answer
    answer = [c["text"] for m in history if m["role"] == "assistant" for c in m["content"]][0]
    api = client.chat.completions.create(
        model=MODEL,
        temperature=SAMPLED[0],
        top_p=SAMPLED[1],
        max_tokens=SAMPLED[2],
        seed=SAMPLED[3],
        messages=ask(
            "Has the lesion grown?",
            image_part(png_bytes(7), role="prior", date="2025-03-01"),
            image_part(png_bytes(8), role="current"),
        ),
    )
    assert " ".join((api.choices[0].message.content or "…").split()) == " ".join(answer.split())


def test_chat_volume_in_the_box_and_a_dicom_series_in_a_slot(live, chat, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, engine = live
    w = hu_volume()
    (nii,) = _files(tmp_path, [("Doe_Jane.nii.gz", nifti_gz(w))])
    _, history, preview, info = chat.predict(
        {"text": "Describe.", "files": [handle_file(nii)]}, *SAMPLED, api_name="/chat"
    )
    images, messages = engine.calls[-1]
    expected = volume_slices(nifti_gz(w), n_slices=8, name="x.nii.gz")
    assert len(images) == 8 and all(same_pixels(a, b) for a, b in zip(images, expected.images, strict=True))
    assert messages[0]["content"][-1]["text"].startswith(
        "Images 1-8: CT volume in lung, soft tissue and bone"
    )
    assert expected.prompt_text in messages[0]["content"][-1]["text"]
    assert "10 axial slices" in info and "NIfTI" in info and preview

    # the slice scroller renders any slice in any CT window
    scrolled, scrolled_info = chat.predict(5, "bone", api_name="/scroll")
    assert scrolled and "Showing slice 5 of 10" in scrolled_info and "bone (W1800/L400)" in scrolled_info

    # a DICOM series as files in the current slot, with a plane, slice count and window: one volume
    series = _files(tmp_path, dicom_series(w))
    _, history, _, info = chat.predict(
        {"text": "And now?", "files": []},
        *SAMPLED,
        current_files=[handle_file(p) for p in series],
        current_date="2025-07-01",
        axis="coronal",
        n_slices=3,
        windows="soft tissue",
        api_name="/chat",
    )
    images, messages = engine.calls[-1]
    expected = volume_slices(series, n_slices=3, axis="coronal", windows=["soft_tissue"])
    assert len(images) == 11 and all(
        same_pixels(a, b) for a, b in zip(images[8:], expected.images, strict=True)
    )
    assert messages[-1]["content"][-1]["text"] == (
        "Images 9-11: current study (2025-07-01), CT volume in the soft tissue window. "
        f"{expected.prompt_text}.\nAnd now?"
    )
    assert "DICOM series · Modality CT, BodyPartExamined CHEST" in info
    shown = str(history) + info
    for secret in ("Doe", "Jane", PATIENT_ID, "19610203", "1.2.826"):
        assert secret not in shown

    # a bad date, or a slot holding two series, is refused (by upload number, without identifiers)
    with pytest.raises(AppError, match="YYYY-MM-DD"):
        chat.predict(
            {"text": "q", "files": []},
            *SAMPLED,
            prior_files=[handle_file(nii)],
            prior_date="March",
            api_name="/chat",
        )
    (tmp_path / "m").mkdir()
    two = _files(
        tmp_path / "m",
        dicom_series(w[:3]) + [(f"x{k}.dcm", d) for k, (_, d) in enumerate(dicom_series(w[:3]))],
    )
    with pytest.raises(
        AppError, match="Upload 3 cannot be read as a volume: the upload holds 2 DICOM series"
    ) as error:
        chat.predict(
            {"text": "q", "files": []}, *SAMPLED, prior_files=[handle_file(p) for p in two], api_name="/chat"
        )
    assert "Doe" not in str(error.value)


def test_chat_refuses_a_volume_over_the_image_limit(live, chat, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    files = _files(tmp_path, [(f"scan{k}.png", png_bytes(k)) for k in range(12)])
    chat.predict(
        {"text": "Twelve images.", "files": [handle_file(f) for f in files]}, *SAMPLED, api_name="/chat"
    )
    (nii,) = _files(tmp_path, [("v.nii.gz", nifti_gz(hu_volume()))])
    with pytest.raises(AppError, match="at most 12 images"):
        chat.predict({"text": "And a volume?", "files": [handle_file(nii)]}, *SAMPLED, api_name="/chat")


# ---------------------------------------------------------------------------------------------------------------
# Spoken questions
# ---------------------------------------------------------------------------------------------------------------


def test_transcription_endpoint_through_the_openai_client(live, client):
    with SPEECH.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    wer = word_error_rate(SPOKEN, result.text)
    print(f"\nWhisper base through the API: {result.text!r}, WER {wer:.2f}")
    assert wer <= 0.3
    with SPEECH.open("rb") as f:
        verbose = client.audio.transcriptions.create(
            model="tiny.en", file=f, response_format="verbose_json", language="en", prompt="lesion, lung"
        )
    assert verbose.language == "en" and 2.0 < verbose.duration < 6.0
    assert word_error_rate(SPOKEN, verbose.text) <= 0.4 and verbose.segments
    with SPEECH.open("rb") as f:
        text = client.audio.transcriptions.create(
            model="tiny.en", file=f, response_format="text", language="en", prompt="lesion, lung"
        )
    assert isinstance(text, str) and text.strip() == verbose.text.strip()


def test_transcription_errors(live, monkeypatch):
    url, _ = live
    endpoint = url + "/v1/audio/transcriptions"
    audio = SPEECH.read_bytes()

    def send(files=None, **data):
        files = {"file": ("q.webm", audio)} if files is None else files
        return httpx.post(endpoint, files={**files, **{k: (None, v) for k, v in data.items()}}, timeout=60)

    openai_error(send(model="gpt-4o-transcribe"), 404, "model_not_found")
    openai_error(send(model="whisper-1", response_format="srt"), 400, "unsupported_parameter")
    openai_error(send(model="whisper-1", timestamp_granularities="word"), 400, "unsupported_parameter")
    openai_error(send(model="whisper-1", temperature="0.4"), 400, "unsupported_parameter")
    assert "ISO-639-1" in send(model="whisper-1", language="english").json()["error"]["message"]
    assert "English-only" in send(model="tiny.en", language="fr").json()["error"]["message"]
    assert "'file' is required" in send(files={}, model="whisper-1").json()["error"]["message"]
    assert "'other'" in send(files={"other": ("a", b"x")}, model="whisper-1").json()["error"]["message"]
    bad = openai_error(
        send(files={"file": ("q.webm", b"not audio at all")}, model="whisper-1"), 400, "invalid_audio"
    )
    assert "not a readable audio file" in bad["message"] and "q.webm" not in bad["message"]
    r = httpx.post(endpoint, json={"model": "whisper-1"}, timeout=10)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    import serve.api

    monkeypatch.setattr(serve.api, "MAX_AUDIO_BYTES", 4096)
    monkeypatch.setattr(serve.api, "_FORM_OVERHEAD", 0)
    openai_error(send(model="whisper-1"), 413, "request_too_large")  # the whole body, before parsing the form
    monkeypatch.setattr(serve.api, "_FORM_OVERHEAD", 10**6)
    openai_error(send(model="whisper-1"), 413, "audio_too_large")  # the file itself
    still_serving(url)


def test_transcription_runs_off_the_event_loop(live, monkeypatch):
    import serve.api

    url, _ = live
    started, release = threading.Event(), threading.Event()

    def slow_transcribe(audio, **kwargs):
        started.set()
        assert release.wait(30)
        return {"text": "done", "duration_s": 1.0, "language": "en", "segments": []}

    monkeypatch.setattr(serve.api, "transcribe", slow_transcribe)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            r=httpx.post(
                url + "/v1/audio/transcriptions",
                files={"file": ("q.webm", b"x")},
                data={"model": "whisper-1"},
                timeout=60,
            )
        )
    )
    worker.start()
    try:
        assert started.wait(30)
        # while the transcription blocks its worker thread, the server still answers
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        still_serving(url)
    finally:
        release.set()
        worker.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["text"] == "done"


def test_chat_microphone_transcribes_into_the_question_box(chat):
    from gradio_client import handle_file

    box = chat.predict(
        handle_file(str(SPEECH)), {"text": "Please answer:", "files": []}, api_name="/transcribe"
    )
    assert box["text"].startswith("Please answer: ")
    assert word_error_rate(SPOKEN, box["text"].removeprefix("Please answer: ")) <= 0.3
