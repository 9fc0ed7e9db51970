"""OpenAI-compatible HTTP API over `Engine.respond`: /v1/chat/completions (plain and streamed), /v1/models, /health.

Mounted beside the Gradio chat by `serve.app`; run with `python -m serve --model default`. Requests are checked
before any model work: images only as `data:` URLs (http(s) URLs and file paths are refused, so a request can
neither make the server fetch anything nor read its files), limits on body, image bytes and pixels, images,
messages, prompt tokens and max tokens; every refusal is a 4xx JSON error in OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError

from medllava.generation import SamplingParams
from medllava.processing import ImageLoadError, load_image
from serve.engine import NOT_FOR_CLINICAL_USE, Busy, Engine

NOTICE_HEADERS = {"X-MedLLaVA-Notice": "research use only; not for clinical use"}
CREATED = int(time.time())
# Request fields we honour; anything else is refused by name rather than silently ignored.
_SUPPORTED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "n",
    "stop",
    "user",
}
# Fields accepted only at their neutral value (clients often send them explicitly).
_NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logit_bias": None,
    "top_logprobs": None,
    "response_format": None,
}
_ROLES = ("system", "developer", "user", "assistant")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=NOTICE_HEADERS)


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
# Request parsing (pure functions of the JSON body and the engine's limits)
# ---------------------------------------------------------------------------------------------------------------


def _number(body: dict, key: str, low: float, high: float, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", param=key)
    return value


def _integer(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise APIError(
            400,
            f"'{key}' must be an integer {bound}, got {value!r}",
            param=key,
            code="max_tokens_over_limit" if key.startswith("max_") and high is not None else None,
        )
    return value


def decode_image_url(url, where: str, engine: Engine) -> Image.Image:
    """A `data:` URL -> RGB image through `load_image` (PNG, JPEG, DICOM, NIfTI, ...); anything else is refused."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: 'image_url.url' must be a non-empty string", param=where)
    match = _DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else "a file path"
        raise APIError(
            400,
            f"{where}: only data: URLs are accepted (got {scheme}); the server never fetches "
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
    limit = engine.limits.max_image_bytes
    if len(payload) * 3 // 4 > limit + 3:
        raise APIError(
            400,
            f"{where}: image is about {len(payload) * 3 // 4 / 2**20:.1f} MiB; the limit is "
            f"{limit / 2**20:.0f} MiB",
            param=where,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{where}: the data: URL is not valid base64", param=where, code="invalid_image"
        ) from None
    if len(data) > limit:
        raise APIError(
            400,
            f"{where}: image is {len(data) / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB",
            param=where,
            code="image_too_large",
        )
    mime = match["mime"].lower()
    source = io.BytesIO(data)
    # load_image sniffs the format from the bytes; the media type only helps files without a magic number.
    source.name = where + (".dcm" if "dicom" in mime else ".nii" if "nifti" in mime else "")
    max_pixels = engine.limits.max_image_pixels
    try:  # read only the header first, so an oversized PNG/JPEG is refused before it is decoded
        width, height = Image.open(io.BytesIO(data)).size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        width = height = 0
    if width * height > max_pixels:
        raise APIError(
            400,
            f"{where}: image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
            param=where,
            code="image_too_large",
        )
    try:
        image = load_image(source)
    except ImageLoadError as e:
        raise APIError(400, f"cannot read the image: {e}", param=where, code="invalid_image") from None
    if image.width * image.height > max_pixels:
        raise APIError(
            400,
            f"{where}: image is {image.width}x{image.height} = {image.width * image.height:,} "
            f"pixels; the limit is {max_pixels:,}",
            param=where,
            code="image_too_large",
        )
    return image


def _parts(message: dict, i: int, engine: Engine, images: list) -> list[dict]:
    """A message's content (string or OpenAI parts) -> schema parts; images are decoded and appended."""
    role, content, where = message["role"], message.get("content"), f"messages[{i}].content"
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(
            400,
            f"{where} must be a string or a list of content parts, got {type(content).__name__}",
            param=where,
        )
    parts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{here}: a text part needs a string 'text'", param=here)
            if engine.image_token.lower() in text.lower():
                raise APIError(
                    400,
                    f"{here}: text must not contain the image token '{engine.image_token}'; "
                    "send images as image_url parts",
                    param=here,
                )
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            if role != "user":
                raise APIError(
                    400, f"{here}: images are only accepted in user messages, not {role}", param=here
                )
            if len(images) >= engine.limits.max_images:
                raise APIError(
                    400,
                    f"{here}: more than {engine.limits.max_images} images in the request",
                    param=here,
                    code="too_many_images",
                )
            images.append(decode_image_url(part.get("image_url"), here, engine))
            parts.append({"type": "image"})
        else:
            raise APIError(
                400, f"{here}: unsupported content part type {kind!r} (use 'text' or 'image_url')", param=here
            )
    return parts


def parse_messages(raw, engine: Engine) -> tuple[list, list[dict]]:
    """OpenAI messages -> (images, schema messages): optional leading system turn, then user/assistant turns
    alternating and ending with a user turn. Consecutive turns of one role are joined, as OpenAI allows them."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    if len(raw) > engine.limits.max_messages:
        raise APIError(
            400,
            f"{len(raw)} messages; the limit is {engine.limits.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    images: list = []
    messages: list[dict] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise APIError(
                400,
                f"messages[{i}]: unsupported role {role!r} (use system, user or assistant)",
                param=f"messages[{i}].role",
                code="invalid_role",
            )
        role = "system" if role == "developer" else role
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
        parts = _parts(message, i, engine, images)
        if messages and messages[-1]["role"] == role:
            previous = messages[-1]["content"]
            if previous and parts and previous[-1]["type"] == parts[0]["type"] == "text":
                parts[0] = {"type": "text", "text": previous.pop()["text"] + "\n\n" + parts[0]["text"]}
            previous.extend(parts)
        else:
            messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message", param="messages", code="invalid_role")
    return images, messages


def parse_chat_request(body, engine: Engine, model_ids: tuple[str, ...]) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in _NEUTRAL:
            if value not in (_NEUTRAL[key], None, [], {}) and not (
                key == "response_format" and value == {"type": "text"}
            ):
                raise APIError(
                    400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
                )
        elif key not in _SUPPORTED:
            raise APIError(
                400, f"unrecognised request argument '{key}'", param=key, code="unsupported_parameter"
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (see GET /v1/models)", param="model")
    if model not in model_ids:
        raise APIError(
            404,
            f"model '{model}' is not served here; this server serves '{model_ids[0]}'",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    if _integer(body, "n", 1, 1) not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    limits = engine.limits
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_new_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limits.max_new_tokens)
    seed = _integer(body, "seed", 0, 2**63 - 1)
    params = SamplingParams(
        max_new_tokens=max_tokens or limits.default_new_tokens,
        temperature=float(_number(body, "temperature", 0, 2, 0.0)),  # default greedy (reproducible answers)
        top_p=float(_number(body, "top_p", 1e-9, 1, 1.0)),
        seed=seed,
    )
    images, messages = parse_messages(body.get("messages"), engine)
    try:
        engine.check(images, messages, params)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    return ChatRequest(
        model=model,
        images=images,
        messages=messages,
        params=params,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        stop=stop,
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
    except Busy as e:  # cannot happen after admission, but never leave a stream without an ending
        yield _sse(APIError(429, str(e), code="server_busy", type="rate_limit_error").body())
    except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-band, keep serving
        yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
    finally:
        pieces.close()
    yield "data: [DONE]\n\n"


async def _closing(gen: Iterator[str]):
    """Iterate a sync generator off the event loop and close it however the response ends.

    Starlette drops a sync iterator whose client disconnects without closing it, so its generator (and the
    generation slot it holds) would linger until garbage collection; closing it here frees the slot at once.
    """
    from starlette.concurrency import iterate_in_threadpool

    try:
        async for item in iterate_in_threadpool(gen):
            yield item
    finally:
        for _ in range(600):  # the worker thread may still be inside next(); close once it has returned
            try:
                await run_in_threadpool(gen.close)
                break
            except ValueError:  # "generator already executing"
                await asyncio.sleep(0.05)


async def _read_json(request: Request, limit: int):
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
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


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

    @router.get("/health")
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

    @router.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [model_card(engine)]}, headers=NOTICE_HEADERS)

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in model_ids:
            return error_response(
                APIError(
                    404,
                    f"model '{model_id}' is not served here",
                    param="model",
                    code="model_not_found",
                    type="not_found_error",
                )
            )
        return JSONResponse(model_card(engine), headers=NOTICE_HEADERS)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await _read_json(request, engine.limits.max_body_bytes)
            chat = await run_in_threadpool(parse_chat_request, body, engine, model_ids)  # decodes images
            ticket = engine.admit()
        except APIError as e:
            return error_response(e)
        except Busy as e:
            return error_response(APIError(429, str(e), code="server_busy", type="rate_limit_error"))
        if chat.stream:
            return StreamingResponse(
                _closing(_stream(engine, chat, ticket)),
                media_type="text/event-stream",
                headers={**NOTICE_HEADERS, "Cache-Control": "no-cache"},
            )
        try:
            result = await run_in_threadpool(_complete, engine, chat, ticket)
        except Exception as e:  # noqa: BLE001 - a failed generation is a 500 for this request, not a dead server
            return error_response(
                APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            )
        return JSONResponse(result, headers=NOTICE_HEADERS)

    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(path: str, request: Request):
        return error_response(
            APIError(
                404,
                f"no route {request.method} /v1/{path}; this server offers "
                "POST /v1/chat/completions and GET /v1/models",
                code="unknown_route",
                type="not_found_error",
            )
        )

    return router
