"""OpenAI-compatible HTTP API over `Engine.respond`: /v1/chat/completions (plain and streamed), /v1/models, /health.

Mounted beside the Gradio chat by `serve.app`; run with `python -m serve --model default`. A request is checked
before any model work, cheapest check first: body bytes, JSON syntax (nesting depth, valid Unicode) and size,
then its shape against typed pydantic models (unknown fields refused, ranges as field bounds), then message
count, characters of text and images, then images (only `data:` URLs: a request can neither make the server
fetch anything nor read its files; every image limit is checked by `load_image` from the header), and the prompt
tokens last. Every refusal is a 4xx JSON error in OpenAI's shape {"error": {"message", "type", "param", "code"}},
and so are unknown routes (404) and wrong methods (405). Requests then wait for a generation slot in arrival
order (`FairQueue`); a request whose client has gone leaves the queue, or stops generating, at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
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
from fastapi.responses import JSONResponse, StreamingResponse
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
from medllava.processing import ImageLoadError, ImageTooLargeError, load_image
from serve.engine import NOT_FOR_CLINICAL_USE, Busy, Cancelled, Engine, Limits, QueueTimeout

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


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # "auto" | "low" | "high": accepted, the image is always resized the same way


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, kind: str) -> str:
        if kind not in ("text", "image_url"):
            raise _custom(
                "unsupported_content", f"unsupported content part type {kind!r} (use 'text' or 'image_url')"
            )
        return kind

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, value):
        return {"url": value} if isinstance(value, str) else value  # a bare URL string, as some clients send

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise _custom("invalid_content", "a text part needs a string 'text' (and no 'image_url')")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise _custom(
                "invalid_content", "an image_url part needs 'image_url': {'url': ...} (and no 'text')"
            )
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


def decode_image_url(url: str, where: str, engine: Engine):
    """A `data:` URL -> RGB image through `load_image` (PNG, JPEG, DICOM, NIfTI, ...); anything else is refused."""
    if not url:
        raise APIError(400, f"{where}: 'image_url.url' must be a non-empty string", param=where)
    match = _DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else "a file path"
        raise APIError(
            400,
            f"{where}: only data: URLs are accepted (got {scheme[:20]}); the server never fetches "
            "URLs or reads its own files. Send the image inline: data:image/png;base64,<base64 bytes>",
            param=where,
            code="image_url_not_allowed",
        )
    if ";base64" not in match["params"].lower():
        raise APIError(
            400,
            f"{where}: the data: URL must be base64-encoded (data:<type>;base64,...)",
            param=where,
            code="invalid_image",
        )
    payload = url[match.end() :]
    limits = engine.limits
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise APIError(
            400,
            f"{where}: image is about {len(payload) * 3 // 4 / 2**20:.2f} MiB; the limit is "
            f"{limits.max_image_bytes / 2**20:.2f} MiB",
            param=where,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{where}: the data: URL is not valid base64", param=where, code="invalid_image"
        ) from None
    if len(data) > limits.max_image_bytes:
        raise APIError(
            400,
            f"{where}: image is {len(data) / 2**20:.2f} MiB; the limit is {limits.max_image_bytes / 2**20:.2f} MiB",
            param=where,
            code="image_too_large",
        )
    mime = match["mime"].lower()
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


def parse_messages(raw: list[Message], engine: Engine) -> tuple[list, list[dict]]:
    """Typed OpenAI messages -> (images, schema messages): optional leading system turn, then user/assistant turns
    alternating and ending with a user turn. Consecutive turns of one role are joined, as OpenAI allows them.

    Everything cheap (order of roles, counts, characters of text) is checked before any image is decoded."""
    messages: list[dict] = []
    urls: list[tuple[str, str]] = []  # (url, where) of each image, in order
    for i, message in enumerate(raw):
        role = "system" if message.role == "developer" else message.role
        if role == "system" and any(m["role"] != "system" for m in messages):
            raise APIError(
                400,
                f"messages[{i}]: a system message is only accepted before the first user message",
                param=f"messages[{i}].role",
                code="invalid_role",
            )
        if role == "assistant" and (not messages or messages[-1]["role"] == "system"):
            raise APIError(
                400,
                f"messages[{i}]: the conversation must start with a user message (after an "
                "optional system message)",
                param=f"messages[{i}].role",
                code="invalid_role",
            )
        parts = []
        for j, part in enumerate(message.content):
            here = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise APIError(
                    400, f"{here}: images are only accepted in user messages, not {role}", param=here
                )
            if len(urls) >= engine.limits.max_images:
                raise APIError(
                    400,
                    f"{here}: more than {engine.limits.max_images} images in the request",
                    param=here,
                    code="too_many_images",
                )
            urls.append((part.image_url.url, here))
            parts.append({"type": "image"})
        if messages and messages[-1]["role"] == role:
            previous = messages[-1]["content"]
            if previous and parts and previous[-1]["type"] == parts[0]["type"] == "text":
                parts[0] = {"type": "text", "text": previous.pop()["text"] + "\n\n" + parts[0]["text"]}
            previous.extend(parts)
        else:
            messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message", param="messages", code="invalid_role")
    try:
        engine.check_text(messages)  # characters, before anything is tokenised
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    image_token = engine.image_token.lower()
    for i, message in enumerate(messages):
        for part in message["content"]:
            if part["type"] == "text" and image_token in part["text"].lower():
                raise APIError(
                    400,
                    f"messages[{i}]: text must not contain the image token '{engine.image_token}'; "
                    "send images as image_url parts",
                    param=f"messages[{i}].content",
                )
    images = [decode_image_url(url, where, engine) for url, where in urls]
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

    # Any other method on these routes is a 405 and any other path under /v1 a 404, in OpenAI's shape (registered
    # after the routes above; without them the Gradio app mounted at / would answer {"detail": "Not Found"}).
    allowed = {
        "/health": ("GET", "HEAD"),
        "/v1/models": ("GET", "HEAD"),
        "/v1/models/{model_id:path}": ("GET", "HEAD"),
        "/v1/chat/completions": ("POST",),
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
                "POST /v1/chat/completions and GET /v1/models",
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
