"""OpenAI-compatible HTTP API over `Engine.respond`: /v1/chat/completions (plain and streamed), /v1/audio/transcriptions,
/v1/models, /health.

Mounted beside the Gradio chat by `serve.app`; run with `python -m serve --model default`. A request is checked
before any model work, cheapest check first: body bytes, JSON syntax (nesting depth, valid Unicode) and size,
then its shape against typed pydantic models (unknown fields refused, ranges as field bounds), then message
count, characters of text and images, then images (only `data:` URLs: a request can neither make the server
fetch anything nor read its files; every image limit is checked by `load_image` from the header) and volumes
(the extension part `volume_url`: a NIfTI file or a zipped DICOM series, rendered as slices by `serve.inputs`;
an image or volume may say its role and study date, which `medllava.image_roles` puts into the text), and the
prompt tokens last. Every refusal is a 4xx JSON error in OpenAI's shape {"error": {"message", "type", "param",
"code"}}, and so are unknown routes (404) and wrong methods (405). Requests then wait for a generation slot in
arrival order (`FairQueue`); a request whose client has gone leaves the queue, or stops generating, at once.
Transcriptions (OpenAI's multipart form) run `medllava.speech.transcribe` in a worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import reprlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from medllava.generation import SamplingParams
from medllava.image_roles import ROLES, ImageInput, check_date, describe_images
from medllava.processing import ImageLoadError, ImageTooLargeError, load_image
from medllava.speech import MAX_AUDIO_BYTES, AudioError, AudioTooLargeError, transcribe
from medllava.speech import MODELS as SPEECH_MODELS
from medllava.volumes import AXES, CT_WINDOWS, VolumeError, VolumeTooLargeError
from serve.engine import NOT_FOR_CLINICAL_USE, Busy, Cancelled, Engine, Limits, QueueTimeout
from serve.inputs import MAX_VOLUME_BYTES, TooManyImages, open_volume, show_slices, volume_error_text

NOTICE_HEADERS = {"X-MedLLaVA-Notice": "research use only; not for clinical use"}
CREATED = int(time.time())
_ROLES = ("system", "developer", "user", "assistant")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_brief = reprlib.Repr()  # echoes a client's value briefly, however large or deep it is
_brief.maxstring, _brief.maxother, _brief.maxlist, _brief.maxdict, _brief.maxlevel = 60, 60, 4, 4, 2
_shown = _brief.repr


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**NOTICE_HEADERS, **error.headers})


def _busy(error: Busy) -> APIError:
    if isinstance(error, QueueTimeout):
        return APIError(
            503, str(error), code="queue_timeout", type="server_error", headers={"Retry-After": "10"}
        )
    return APIError(429, str(error), code="server_busy", type="rate_limit_error")


@dataclass
class ChatRequest:
    model: str
    images: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The request's shape: pydantic models (strict types, unknown fields refused, ranges as field bounds)
# ---------------------------------------------------------------------------------------------------------------


# Our own validation errors (`_custom`): the message is complete and the type becomes the OpenAI error code.
_OWN_ERRORS = {"unsupported_content", "invalid_content", "invalid_role", "unsupported_parameter"}


def _custom(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message.replace("{", "{{").replace("}", "}}"))


def _must_be_neutral(cls, value: Any, info) -> Any:
    """OpenAI fields accepted only at their neutral value (clients often send them explicitly)."""
    neutral = value in (None, False, 0, [], {}) or (
        info.field_name == "response_format" and value == {"type": "text"}
    )
    if not neutral:
        raise _custom("unsupported_parameter", f"'{info.field_name}' is not supported by this server")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Study(_Strict):
    """Extension fields saying what an image or volume is (see docs/inputs.md); OpenAI clients pass them through."""

    role: str | None = None  # "prior" | "current"
    date: str | None = None  # the study date, YYYY-MM-DD

    @field_validator("role")
    @classmethod
    def _known_role(cls, role):
        if role is not None and role not in ROLES:
            raise _custom(
                "invalid_content", f"unknown image role {role!r} (use {' or '.join(map(repr, ROLES))})"
            )
        return role

    @field_validator("date")
    @classmethod
    def _iso_date(cls, date):
        if date is not None:
            try:
                check_date(date)
            except ValueError as e:
                raise _custom("invalid_content", str(e)) from None
        return date


class ImageURL(_Study):
    url: str
    detail: str | None = None  # "auto" | "low" | "high": accepted, the image is always resized the same way


class VolumeURL(_Study):
    """A CT/MRI volume (extension part `volume_url`): a NIfTI file or a zip of one DICOM series as a data: URL."""

    url: str
    n_slices: int | None = Field(None, ge=1)  # default: 8, or the images left under the server's limit
    axis: str | None = None  # axial (default), coronal, sagittal
    windows: list[str | Annotated[list[float], Field(min_length=2, max_length=2)]] | None = Field(
        None, min_length=1, max_length=3
    )  # CT only: 1 (gray) or 3 (RGB) of CT_WINDOWS names or [level, width] pairs; default lung, soft tissue, bone
    modality: str | None = None  # "CT" or "MR": overrides the DICOM tag or the NIfTI guess

    @field_validator("axis")
    @classmethod
    def _known_axis(cls, axis):
        if axis is not None and axis not in AXES:
            raise _custom("invalid_content", f"unknown axis {axis!r} (use {', '.join(AXES)})")
        return axis

    @field_validator("windows")
    @classmethod
    def _known_windows(cls, windows):
        if windows is None:
            return windows
        if len(windows) == 2:
            raise _custom("invalid_content", "give 1 window (gray) or 3 windows (red, green, blue), not 2")
        for window in windows:
            if isinstance(window, str) and window not in CT_WINDOWS:
                raise _custom(
                    "invalid_content",
                    f"unknown window {window!r} (use {', '.join(CT_WINDOWS)} or [level, width] in HU)",
                )
            if not isinstance(window, str) and not window[1] > 0:
                raise _custom("invalid_content", f"a window's width must be positive, got {window[1]}")
        return windows

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, modality):
        if modality is not None and modality.upper() not in ("CT", "MR", "MRI"):
            raise _custom("invalid_content", f"modality must be 'CT' or 'MR', got {modality!r:.20}")
        return modality


_PART_TYPES = ("text", "image_url", "volume_url")


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    volume_url: VolumeURL | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, kind: str) -> str:
        if kind not in _PART_TYPES:
            raise _custom(
                "unsupported_content",
                f"unsupported content part type {kind!r} (use 'text', 'image_url' or 'volume_url')",
            )
        return kind

    @field_validator("image_url", "volume_url", mode="before")
    @classmethod
    def _url_string(cls, value):
        return {"url": value} if isinstance(value, str) else value  # a bare URL string, as some clients send

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        present = [name for name in _PART_TYPES if getattr(self, name) is not None]
        if present != [self.type]:
            if self.type == "text":
                message = "a text part needs a string 'text' (and no 'image_url' or 'volume_url')"
            else:
                article = "an" if self.type == "image_url" else "a"
                message = f"{article} {self.type} part needs '{self.type}': {{'url': ...}} (and nothing else)"
            raise _custom("invalid_content", message)
        return self


class Message(_Strict):
    role: str
    content: list[ContentPart]
    name: str | None = None  # accepted, not used
    # what the openai client puts in an assistant message it returned: accepted when empty
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    check_neutral = field_validator("refusal", "tool_calls", "function_call", "audio", "annotations")(
        _must_be_neutral
    )

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in _ROLES:
            raise _custom("invalid_role", f"unsupported role {role!r} (use system, user or assistant)")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise _custom(
                "invalid_content",
                f"must be a string or a list of content parts, got {type(content).__name__}",
            )
        return content


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; this server never pads its chunks


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. `request_model(limits)` narrows the bounds that depend on the server's limits."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # default 0: greedy, reproducible answers
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)
    user: str | None = None  # accepted, not used
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    parallel_tool_calls: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    check_neutral = field_validator(
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "parallel_tool_calls",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
    )(_must_be_neutral)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        return [stop] if isinstance(stop, str) else stop

    @field_validator("n")
    @classmethod
    def _one(cls, n):
        if n not in (None, 1):
            raise _custom("unsupported_parameter", f"only n=1 is supported, got {n}")
        return n


def request_model(limits: Limits) -> type[ChatCompletionRequest]:
    """The request model with this server's limits as field bounds (message count, max tokens)."""
    fields: dict[str, Any] = {
        "messages": (list[Message], Field(min_length=1, max_length=limits.max_messages)),
        "max_tokens": (int | None, Field(None, ge=1, le=limits.max_new_tokens)),
        "max_completion_tokens": (int | None, Field(None, ge=1, le=limits.max_new_tokens)),
    }
    return create_model("ChatCompletionRequest", __base__=ChatCompletionRequest, **fields)


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bounds(model: type[BaseModel], name: str) -> str:
    """'an integer between 1 and 256', 'a number in [0, 2]', ... from a top-level field's annotation and bounds."""
    info = model.model_fields[name]
    low = high = None
    for bound in info.metadata:
        low = getattr(bound, "ge", getattr(bound, "gt", low))
        high = getattr(bound, "le", getattr(bound, "lt", high))
    integer = "int" in str(info.annotation)
    if integer:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        return f"an integer {bound}"
    opening = "(" if any(hasattr(b, "gt") for b in info.metadata) else "["
    return f"a number in {opening}{low}, {high}]"


_TYPE_NAMES = {
    "bool_type": "true or false",
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "list_type": "a list",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
}


def validation_error(error: ValidationError, model: type[BaseModel], body: dict) -> APIError:
    """The first problem pydantic found as an OpenAI-shaped 400, with a count of the others."""
    first = error.errors(include_url=False)[0]
    body_stop = body.get("stop")
    kind, loc, ctx = first["type"], first["loc"], first.get("ctx") or {}
    param, top = _param(loc), len(loc) == 1
    name = loc[0] if loc else ""
    code = None
    if kind == "missing":
        message = f"'{param}' is required" + (" (see GET /v1/models)" if param == "model" else "")
    elif kind == "extra_forbidden":
        where = _param(loc[:-1])
        message = (
            f"unrecognised request argument '{loc[-1]}'"
            if top
            else f"{where}: unrecognised field '{loc[-1]}'"
        )
        code = "unsupported_parameter"
    elif (
        kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number")
        and top
    ):
        message = f"'{param}' must be {_bounds(model, name)}, got {_shown(first['input'])}"
        if str(name).startswith("max_") and kind == "less_than_equal":
            code = "max_tokens_over_limit"
    elif kind == "too_long" and param == "messages":
        message = f"{ctx.get('actual_length')} messages; the limit is {ctx['max_length']}"
        code = "too_many_messages"
    elif kind == "too_short" and param in ("messages", "model"):
        message = (
            "'messages' must be a non-empty list"
            if param == "messages"
            else "'model' is required (see GET /v1/models)"
        )
    elif param.startswith("stop"):
        message = f"'stop' must be a non-empty string or a list of up to 4 of them, got {_shown(body_stop)}"
        param = "stop"
    elif kind in _OWN_ERRORS:
        message = first["msg"] if top else f"{param}: {first['msg']}"
        code = kind
    elif kind in _TYPE_NAMES:
        expected = _TYPE_NAMES[kind]
        if top and name in model.model_fields and kind in ("int_type", "float_type"):
            expected = _bounds(model, name) if model.model_fields[name].metadata else expected
        message = f"'{param}' must be {expected}, got {_shown(first['input'])}"
    else:
        message = f"{param}: {first['msg']}" if param else first["msg"]
    if error.error_count() > 1:
        message += f" (and {error.error_count() - 1} more problem(s) in the request)"
    return APIError(400, message, param=param or None, code=code)


# ---------------------------------------------------------------------------------------------------------------
# Request checking (functions of the parsed body and the engine's limits)
# ---------------------------------------------------------------------------------------------------------------


def _data_url(url: str, where: str, kind: str) -> tuple[str, str]:
    """(media type, base64 payload) of a `data:` URL; anything else (http, file paths) is refused."""
    if not url:
        raise APIError(400, f"{where}: '{kind}.url' must be a non-empty string", param=where)
    match = _DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else "a file path"
        example = "data:image/png;base64" if kind == "image_url" else "data:application/zip;base64"
        raise APIError(
            400,
            f"{where}: only data: URLs are accepted (got {scheme[:20]}); the server never fetches "
            f"URLs or reads its own files. Send the {kind[:-4]} inline: {example},<base64 bytes>",
            param=where,
            code=f"{kind}_not_allowed",
        )
    if ";base64" not in match["params"].lower():
        raise APIError(
            400,
            f"{where}: the data: URL must be base64-encoded (data:<type>;base64,...)",
            param=where,
            code="invalid_image" if kind == "image_url" else "invalid_volume",
        )
    return match["mime"].lower(), url[match.end() :]


def _b64decode(payload: str, where: str, code: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data: URL is not valid base64", param=where, code=code) from None


def decode_image_url(url: str, where: str, engine: Engine):
    """A `data:` URL -> RGB image through `load_image` (PNG, JPEG, DICOM, NIfTI, ...); anything else is refused."""
    mime, payload = _data_url(url, where, "image_url")
    limits = engine.limits
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise APIError(
            400,
            f"{where}: image is about {len(payload) * 3 // 4 / 2**20:.2f} MiB; the limit is "
            f"{limits.max_image_bytes / 2**20:.2f} MiB",
            param=where,
            code="image_too_large",
        )
    data = _b64decode(payload, where, "invalid_image")
    if len(data) > limits.max_image_bytes:
        raise APIError(
            400,
            f"{where}: image is {len(data) / 2**20:.2f} MiB; the limit is {limits.max_image_bytes / 2**20:.2f} MiB",
            param=where,
            code="image_too_large",
        )
    if data[:4] == b"PK\x03\x04":
        raise APIError(
            400,
            f"{where}: a zip is not an image; send a DICOM series (zipped) or a NIfTI volume as a "
            "'volume_url' part (see docs/inputs.md)",
            param=where,
            code="invalid_image",
        )
    source = io.BytesIO(data)
    # load_image sniffs the format from the bytes; the media type only helps files without a magic number.
    source.name = where + (".dcm" if "dicom" in mime else ".nii" if "nifti" in mime else "")
    try:
        # every image limit (pixels per frame, declared size of a DICOM/NIfTI) is checked there, from the header
        return load_image(
            source, max_pixels=limits.max_image_pixels, max_decoded_bytes=limits.max_decoded_bytes
        )
    except ImageTooLargeError as e:
        raise APIError(400, f"image too large: {e}", param=where, code="image_too_large") from None
    except ImageLoadError as e:
        raise APIError(400, f"cannot read the image: {e}", param=where, code="invalid_image") from None


def decode_volume_url(spec: VolumeURL, where: str, engine: Engine, images_before: int):
    """A `volume_url` part -> `VolumeSlices` (a NIfTI file or a zip of one DICOM series, as a data: URL).

    Over a size limit (bytes, slices, voxels, pixels per slice; all checked from the headers) is a 413
    `volume_too_large`; an unreadable or inconsistent volume a 400 `invalid_volume`."""
    mime, payload = _data_url(spec.url, where, "volume_url")
    if len(payload) * 3 // 4 > MAX_VOLUME_BYTES + 3:
        raise APIError(
            413,
            f"{where}: the volume is about {len(payload) * 3 // 4 / 2**20:.3g} MiB; the limit is "
            f"{MAX_VOLUME_BYTES / 2**20:.3g} MiB",
            param=where,
            code="volume_too_large",
        )
    data = _b64decode(payload, where, "invalid_volume")
    name = where + (".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii" if "nifti" in mime else "")
    try:
        volume = open_volume(data, name, engine.limits, modality=spec.modality)
        return show_slices(
            volume,
            engine.limits,
            images_before,
            n_slices=spec.n_slices,
            axis=spec.axis or "axial",
            windows=spec.windows,
        )
    except TooManyImages as e:
        raise APIError(400, f"{where}: {e}", param=where, code="too_many_images") from None
    except VolumeTooLargeError as e:
        raise APIError(413, f"volume too large: {e}", param=where, code="volume_too_large") from None
    except VolumeError as e:
        raise APIError(
            400, f"cannot read the volume: {volume_error_text(e)}", param=where, code="invalid_volume"
        ) from None


@dataclass
class _Upload:
    """One image_url or volume_url part of a request, until it is decoded."""

    where: str
    study: ImageURL | VolumeURL
    volume: bool
    images: list = field(default_factory=list)
    description: ImageInput | None = None


def _join_turns(messages: list[dict], role: str, parts: list[dict]) -> None:
    """Append a turn; consecutive turns of one role are joined, as OpenAI allows them."""
    if messages and messages[-1]["role"] == role:
        previous = messages[-1]["content"]
        if previous and parts and previous[-1]["type"] == parts[0]["type"] == "text":
            parts[0] = {"type": "text", "text": previous.pop()["text"] + "\n\n" + parts[0]["text"]}
        previous.extend(parts)
    else:
        messages.append({"role": role, "content": parts})


def _with_roles(parts: list, uploads: list[_Upload], first: int) -> list[dict]:
    """A message's parts with its uploads expanded into image placeholders (a volume: one per slice) and, when an
    upload has a role, a date or is a volume, the line of `medllava.image_roles` at the start of the first text
    after the last image (a text part of its own when there is none)."""
    line = describe_images([u.description for u in uploads], first)
    out, last_image = [], -1
    for part in parts:
        if isinstance(part, int):
            out += [{"type": "image"} for _ in uploads[part].images]
            last_image = len(out) - 1
        else:
            out.append(dict(part))
    if line:
        after = next((k for k in range(last_image + 1, len(out)) if out[k]["type"] == "text"), None)
        if after is None:
            out.insert(last_image + 1, {"type": "text", "text": line})
        else:
            out[after] = {"type": "text", "text": f"{line}\n{out[after]['text']}"}
    return out


def parse_messages(raw: list[Message], engine: Engine) -> tuple[list, list[dict]]:
    """Typed OpenAI messages -> (images, schema messages): optional leading system turn, then user/assistant turns
    alternating and ending with a user turn. Consecutive turns of one role are joined, as OpenAI allows them.

    A `volume_url` part becomes its rendered slices; an upload with a role or a date, and every volume, is
    described in the text (`medllava.image_roles`). Everything cheap (order of roles, counts, characters of text)
    is checked before any image or volume is decoded."""
    limits = engine.limits
    turns: list[
        tuple[str, list]
    ] = []  # (role, parts): text parts as dicts, uploads as indices into `uploads`
    uploads: list[_Upload] = []
    in_message: list[list[int]] = []  # the uploads of each turn
    least = 0  # images the request needs at the least (a volume: its n_slices, or 1)
    for i, message in enumerate(raw):
        role = "system" if message.role == "developer" else message.role
        if role == "system" and any(r != "system" for r, _ in turns):
            raise APIError(
                400,
                f"messages[{i}]: a system message is only accepted before the first user message",
                param=f"messages[{i}].role",
                code="invalid_role",
            )
        if role == "assistant" and (not turns or turns[-1][0] == "system"):
            raise APIError(
                400,
                f"messages[{i}]: the conversation must start with a user message (after an "
                "optional system message)",
                param=f"messages[{i}].role",
                code="invalid_role",
            )
        parts, mine = [], []
        for j, part in enumerate(message.content):
            here = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise APIError(
                    400, f"{here}: images are only accepted in user messages, not {role}", param=here
                )
            volume = part.type == "volume_url"
            least += (part.volume_url.n_slices or 1) if volume else 1
            if least > limits.max_images:
                raise APIError(
                    400,
                    f"{here}: more than {limits.max_images} images in the request"
                    + (
                        " (a volume's slices count as images)"
                        if any(u.volume for u in uploads) or volume
                        else ""
                    ),
                    param=here,
                    code="too_many_images",
                )
            mine.append(len(uploads))
            parts.append(len(uploads))
            uploads.append(_Upload(here, part.volume_url if volume else part.image_url, volume))
        turns.append((role, parts))
        in_message.append(mine)
    if turns[-1][0] != "user":
        raise APIError(400, "the last message must be a user message", param="messages", code="invalid_role")
    text_only: list[dict] = []
    for role, parts in turns:
        _join_turns(text_only, role, [p for p in parts if not isinstance(p, int)])
    try:
        engine.check_text(text_only)  # characters, before anything is tokenised
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    image_token = engine.image_token.lower()
    for i, message in enumerate(text_only):
        for part in message["content"]:
            if part["type"] == "text" and image_token in part["text"].lower():
                raise APIError(
                    400,
                    f"messages[{i}]: text must not contain the image token '{engine.image_token}'; "
                    "send images as image_url parts",
                    param=f"messages[{i}].content",
                )

    # Decode, in order: a volume without n_slices gets the room the images before it (and the least the uploads
    # after it need) leave.
    n_images = 0
    for k, upload in enumerate(uploads):
        if upload.volume:
            after = sum((u.study.n_slices or 1) if u.volume else 1 for u in uploads[k + 1 :])
            shown = decode_volume_url(upload.study, upload.where, engine, n_images + after)
            upload.images = shown.images
            upload.description = ImageInput.from_volume(shown, upload.study.role, upload.study.date)
        else:
            upload.images = [decode_image_url(upload.study.url, upload.where, engine)]
            upload.description = ImageInput(role=upload.study.role, date=upload.study.date)
        n_images += len(upload.images)

    messages: list[dict] = []
    images: list = []
    for (role, parts), mine in zip(turns, in_message, strict=True):
        local = {index: k for k, index in enumerate(mine)}
        message_uploads = [uploads[index] for index in mine]
        parts = [local[p] if isinstance(p, int) else p for p in parts]
        _join_turns(messages, role, _with_roles(parts, message_uploads, len(images) + 1))
        for upload in message_uploads:
            images += upload.images
    return images, messages


def parse_chat_request(
    body, engine: Engine, model_ids: tuple[str, ...], model: type[ChatCompletionRequest] | None = None
) -> ChatRequest:
    model = model or request_model(engine.limits)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, model, body) from None
    if request.model not in model_ids:
        raise APIError(
            404,
            f"model {_shown(request.model)} is not served here; this server serves '{model_ids[0]}'",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    limits = engine.limits
    max_tokens = request.max_completion_tokens or request.max_tokens
    params = SamplingParams(
        max_new_tokens=max_tokens or limits.default_new_tokens,
        temperature=0.0 if request.temperature is None else float(request.temperature),
        top_p=1.0 if request.top_p is None else float(request.top_p),
        seed=request.seed,
        stop_event=threading.Event(),  # set when the client leaves: withdraws or stops the request
    )
    images, messages = parse_messages(request.messages, engine)
    try:
        engine.check(images, messages, params)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    return ChatRequest(
        model=request.model,
        images=images,
        messages=messages,
        params=params,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        stop=request.stop or [],
    )


# ---------------------------------------------------------------------------------------------------------------
# Generation and responses
# ---------------------------------------------------------------------------------------------------------------


def until_stop(pieces: Iterator[str], stops: list[str], state: dict) -> Iterator[str]:
    """Pass pieces through, ending at the first stop string (not included). Text that could be the start of a
    stop string is held back until it is known not to be; `state["stopped"]` tells whether one was hit."""
    if not stops:
        yield from pieces
        return
    hold, buffer = max(map(len, stops)) - 1, ""
    for piece in pieces:
        buffer += piece
        hits = [i for i in (buffer.find(s) for s in stops) if i >= 0]
        if hits:
            state["stopped"] = True
            if min(hits):
                yield buffer[: min(hits)]
            pieces.close()  # stops the generation at the next token
            return
        if len(buffer) > hold:
            yield buffer[: len(buffer) - hold]
            buffer = buffer[len(buffer) - hold :]
    if buffer:
        yield buffer


def _usage(usage: dict) -> dict:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(usage: dict, state: dict) -> str:
    return "stop" if state.get("stopped") else usage.get("finish_reason", "stop")


def _complete(engine: Engine, request: ChatRequest, ticket) -> dict:
    usage, state = {}, {}
    pieces = engine.respond(request.images, request.messages, request.params, usage=usage, ticket=ticket)
    text = "".join(until_stop(pieces, request.stop, state))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish(usage, state),
            }
        ],
        "usage": _usage(usage),
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(engine: Engine, request: ChatRequest, ticket) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    usage, state = {}, {}
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse(
            {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    pieces = engine.respond(request.images, request.messages, request.params, usage=usage, ticket=ticket)
    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in until_stop(pieces, request.stop, state):
            yield chunk({"content": piece})
        yield chunk({}, _finish(usage, state))
        if request.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage)})
    except Busy as e:  # cannot happen once the slot is held, but never leave a stream without an ending
        yield _sse(_busy(e).body())
    except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-band, keep serving
        yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
    finally:
        pieces.close()
    yield "data: [DONE]\n\n"


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` as soon as the client disconnects. The body has been read, so the next ASGI message is the
    disconnect (uvicorn also sends it once the response is complete: cancel this task before then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _closing(gen: Iterator[str], gone: threading.Event, watcher: asyncio.Task, ticket):
    """Iterate a sync generator off the event loop and close it however the response ends.

    Starlette drops a sync iterator whose client disconnects without closing it, so its generator (and the
    generation slot it holds) would linger until garbage collection; here the generation is told to stop (it
    ends within one decoding step), the generator closed and the slot given back at once.
    """
    from starlette.concurrency import iterate_in_threadpool

    try:
        async for item in iterate_in_threadpool(gen):
            yield item
    finally:
        watcher.cancel()
        gone.set()  # a no-op once the answer is complete; otherwise the generation stops at its next step
        for _ in range(600):  # the worker thread may still be inside next(); close once it has returned
            try:
                await run_in_threadpool(gen.close)
                break
            except ValueError:  # "generator already executing"
                await asyncio.sleep(0.05)
        ticket.close()  # if the generator never started, it never held the ticket's slot in a `with`


async def _read_json(request: Request, limits: Limits, max_values: int):
    """The body as JSON, with the cheap bounds first: bytes (header, then as it streams in), the number of JSON
    values (counted from the bytes before parsing, so no request builds millions of objects), nesting depth and
    valid Unicode (the parser refuses more than 200 levels and lone surrogates)."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"request body is {int(declared) / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB",
            code="request_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(
                413, f"request body is over the {limit / 2**20:.0f} MiB limit", code="request_too_large"
            )
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    # every array, object and separator counts: an upper bound on the values parsing would create
    values = body.count(b"[") + body.count(b"{") + body.count(b",")
    if values > max_values:
        raise APIError(
            400,
            f"the request body has up to {values:,} JSON values; at most {max_values:,} are accepted",
            code="request_too_complex",
        )
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as e:
        reason = str(e)
        if "recursion limit" in reason:
            reason += " (arrays and objects nested too deeply)"
        elif "surrogate" in reason or "hex escape" in reason or "unicode" in reason:
            reason += (
                " (text must be valid Unicode: a \\ud800-\\udfff escape only as part of a surrogate pair)"
            )
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None


# ---------------------------------------------------------------------------------------------------------------
# Speech to text: POST /v1/audio/transcriptions (OpenAI's multipart form)
# ---------------------------------------------------------------------------------------------------------------

# Model names a client may send: OpenAI's, so unmodified clients work, and the packaged models by name.
SPEECH_ALIASES = {"whisper-1": "base", **{name: name for name in SPEECH_MODELS}}
_AUDIO_FORMATS = ("json", "text", "verbose_json")
_AUDIO_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature")
_MAX_PROMPT_CHARS = 1000  # Whisper reads at most 224 prompt tokens
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields, beside the audio file
_MAX_SPEECH_WAITING = 4


@dataclass
class TranscriptionRequest:
    audio: bytes
    model: str  # a key of medllava.speech.MODELS
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with a 413 as soon as it is known to be over `limit` bytes (header, then streaming)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"request body is {int(declared) / 2**20:.1f} MiB; the limit for {what} is {limit / 2**20:.0f} MiB",
            code="request_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(
                413,
                f"request body is over the {limit / 2**20:.0f} MiB limit for {what}",
                code="request_too_large",
            )
    return bytes(body)


async def read_transcription_request(request: Request) -> TranscriptionRequest:
    """Check a transcription form, cheapest first: bytes, form syntax, fields; the audio is decoded later."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(
            400,
            "send the audio as multipart/form-data with a 'file' field and a 'model' field (as OpenAI's "
            "/v1/audio/transcriptions)",
            code="invalid_request",
        )
    body = await _read_body(request, MAX_AUDIO_BYTES + _FORM_OVERHEAD, "audio")

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    from starlette.exceptions import HTTPException

    try:
        form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=len(_AUDIO_FIELDS))
    except HTTPException as e:
        raise APIError(
            400, f"the multipart form cannot be read: {e.detail}", code="invalid_request"
        ) from None
    try:
        return await _transcription_fields(form)
    finally:
        await form.close()  # the uploaded file's spooled copy


async def _transcription_fields(form) -> TranscriptionRequest:
    for key in form.keys():
        if key not in _AUDIO_FIELDS:
            raise APIError(
                400,
                f"unrecognised request argument '{key[:60]}'",
                param=key[:60],
                code="unsupported_parameter",
            )
        if len(form.getlist(key)) > 1:
            raise APIError(400, f"'{key}' is given more than once", param=key)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "'file' is required: the audio, as a file field of the form", param="file")
    fields = {}
    for key in _AUDIO_FIELDS[1:]:
        value = form.get(key)
        if value is not None and not isinstance(value, str):
            raise APIError(400, f"'{key}' must be a text field, not a file", param=key)
        fields[key] = value
    model = fields["model"]
    if not model:
        raise APIError(400, "'model' is required (e.g. 'whisper-1')", param="model")
    if model not in SPEECH_ALIASES:
        raise APIError(
            404,
            f"speech model {_shown(model)} is not served here; use one of {', '.join(SPEECH_ALIASES)}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    model = SPEECH_ALIASES[model]
    language = fields["language"] or None
    if language is not None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if language not in _LANGUAGE_CODES:
            raise APIError(
                400,
                f"'language' must be an ISO-639-1 code such as 'en', got {_shown(language)}",
                param="language",
            )
        if model.endswith(".en") and language != "en":
            raise APIError(
                400, f"the speech model '{model}' is English-only; got language '{language}'", "language"
            )
    prompt = fields["prompt"] or None
    if prompt is not None and len(prompt) > _MAX_PROMPT_CHARS:
        raise APIError(
            400, f"'prompt' is {len(prompt):,} characters; the limit is {_MAX_PROMPT_CHARS}", "prompt"
        )
    response_format = fields["response_format"] or "json"
    if response_format not in _AUDIO_FORMATS:
        raise APIError(
            400,
            f"'response_format' must be one of {', '.join(_AUDIO_FORMATS)}, got {_shown(response_format)}",
            param="response_format",
            code="unsupported_parameter",
        )
    temperature = fields["temperature"]
    if temperature is not None:
        try:
            neutral = float(temperature) == 0
        except ValueError:
            neutral = False
        if not neutral:
            raise APIError(
                400,
                "only 'temperature' 0 is supported (beam search, deterministic)",
                param="temperature",
                code="unsupported_parameter",
            )
    audio = await upload.read(MAX_AUDIO_BYTES + 1)
    if len(audio) > MAX_AUDIO_BYTES:
        raise APIError(
            413,
            f"the audio file is over the {MAX_AUDIO_BYTES / 2**20:.0f} MiB limit",
            "file",
            "audio_too_large",
        )
    return TranscriptionRequest(audio, model, language, prompt, response_format)


def run_transcription(request: TranscriptionRequest) -> dict:
    """`medllava.speech.transcribe` (CPU-bound: called in a worker thread); audio errors as 4xx."""
    try:
        return transcribe(
            request.audio, model=request.model, language=request.language, prompt=request.prompt, name="file"
        )
    except AudioTooLargeError as e:
        raise APIError(413, str(e), param="file", code="audio_too_large") from None
    except AudioError as e:
        raise APIError(400, str(e), param="file", code="invalid_audio") from None
    except FileNotFoundError as e:  # a speech model's package is not installed
        raise APIError(503, f"the speech model is not available: {e}", type="server_error") from None


def transcription_response(result: dict, response_format: str):
    if response_format == "text":
        return PlainTextResponse(result["text"] + "\n", headers=NOTICE_HEADERS)
    usage = {"type": "duration", "seconds": math.ceil(result["duration_s"])}
    if response_format == "json":
        return JSONResponse({"text": result["text"], "usage": usage}, headers=NOTICE_HEADERS)
    return JSONResponse(
        {
            "task": "transcribe",
            "language": result["language"],
            "duration": result["duration_s"],
            "text": result["text"],
            "segments": result["segments"],
            "usage": usage,
        },
        headers=NOTICE_HEADERS,
    )


def model_card(engine: Engine) -> dict:
    return {
        "id": engine.model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": "medllava",
        "root": engine.source or engine.model_id,
        "description": NOT_FOR_CLINICAL_USE,
    }


def api_router(engine: Engine) -> APIRouter:
    """The API routes for one engine (no module-level state: every route closes over `engine`)."""
    router = APIRouter()
    model_ids = tuple(dict.fromkeys(name for name in (engine.model_id, *engine.aliases) if name))
    model = request_model(engine.limits)
    limits = engine.limits
    # A JSON value per character of text a prompt can hold, plus the structure of the messages and images; at
    # least a million (about 100 MB of Python objects at worst), so only bodies built to exhaust memory hit it.
    max_values = max(10**6, engine.max_text_chars + 64 * (limits.max_messages + limits.max_images))

    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return JSONResponse(
            {
                "status": "ok",
                "model": engine.model_id,
                "pending": engine.pending,
                "notice": NOT_FOR_CLINICAL_USE,
            },
            headers=NOTICE_HEADERS,
        )

    @router.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return JSONResponse({"object": "list", "data": [model_card(engine)]}, headers=NOTICE_HEADERS)

    @router.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model_info(model_id: str):
        if model_id not in model_ids:
            return error_response(
                APIError(
                    404,
                    f"model {_shown(model_id)} is not served here",
                    param="model",
                    code="model_not_found",
                    type="not_found_error",
                )
            )
        return JSONResponse(model_card(engine), headers=NOTICE_HEADERS)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await _read_json(request, limits, max_values)
            chat = await run_in_threadpool(
                parse_chat_request, body, engine, model_ids, model
            )  # decodes images
            ticket = engine.admit()
        except APIError as e:
            return error_response(e)
        except Busy as e:
            return error_response(_busy(e))
        gone = chat.params.stop_event
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:  # wait in line for a slot before any response starts, so a timeout is still a plain 503
            await run_in_threadpool(ticket.wait, limits.max_queue_wait, gone)
        except (Busy, Cancelled) as e:
            watcher.cancel()
            ticket.close()
            if isinstance(e, Cancelled):  # nobody is listening any more
                return error_response(APIError(499, str(e), code="client_closed_request"))
            return error_response(_busy(e))
        if chat.stream:
            return StreamingResponse(
                _closing(_stream(engine, chat, ticket), gone, watcher, ticket),
                media_type="text/event-stream",
                headers={**NOTICE_HEADERS, "Cache-Control": "no-cache"},
            )
        try:
            result = await run_in_threadpool(_complete, engine, chat, ticket)
        except Exception as e:  # noqa: BLE001 - a failed generation is a 500 for this request, not a dead server
            return error_response(
                APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            )
        finally:
            watcher.cancel()
            ticket.close()
        return JSONResponse(result, headers=NOTICE_HEADERS)

    # One transcription at a time (it uses the CPU cores generation also needs); a few more may wait, each holding
    # its audio (at most 25 MiB) in memory.
    speech = {"limiter": None, "pending": 0}

    @router.post("/v1/audio/transcriptions")
    async def audio_transcriptions(request: Request):
        import anyio

        if speech["pending"] >= 1 + _MAX_SPEECH_WAITING:
            return error_response(
                APIError(
                    429,
                    f"the server is busy: {speech['pending']} transcription(s) running or waiting; retry shortly",
                    code="server_busy",
                    type="rate_limit_error",
                )
            )
        speech["pending"] += 1
        try:
            form = await read_transcription_request(request)
            speech["limiter"] = speech["limiter"] or anyio.CapacityLimiter(1)
            result = await anyio.to_thread.run_sync(run_transcription, form, limiter=speech["limiter"])
        except APIError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - a failed transcription is a 500 for this request only
            return error_response(
                APIError(500, f"transcription failed: {type(e).__name__}: {e}", type="server_error")
            )
        finally:
            speech["pending"] -= 1
        return transcription_response(result, form.response_format)

    # Any other method on these routes is a 405 and any other path under /v1 a 404, in OpenAI's shape (registered
    # after the routes above; without them the Gradio app mounted at / would answer {"detail": "Not Found"}).
    allowed = {
        "/health": ("GET", "HEAD"),
        "/v1/models": ("GET", "HEAD"),
        "/v1/models/{model_id:path}": ("GET", "HEAD"),
        "/v1/chat/completions": ("POST",),
        "/v1/audio/transcriptions": ("POST",),
    }
    for path, methods in allowed.items():
        router.add_api_route(
            path,
            _method_not_allowed(path, methods),
            methods=[m for m in _METHODS if m not in methods],
            include_in_schema=False,
        )

    @router.api_route("/v1/{path:path}", methods=list(_METHODS), include_in_schema=False)
    async def unknown(path: str, request: Request):
        return error_response(
            APIError(
                404,
                f"no route {request.method} /v1/{path[:100]}; this server offers "
                "POST /v1/chat/completions, POST /v1/audio/transcriptions and GET /v1/models",
                code="unknown_route",
                type="not_found_error",
            )
        )

    return router


def _method_not_allowed(path: str, methods: tuple[str, ...]):
    shown = path.replace("{model_id:path}", "{model}")

    async def method_not_allowed(request: Request):
        return error_response(
            APIError(
                405,
                f"{request.method} is not allowed on {shown}; use {' or '.join(methods)}",
                code="method_not_allowed",
                headers={"Allow": ", ".join(methods)},
            )
        )

    return method_not_allowed
