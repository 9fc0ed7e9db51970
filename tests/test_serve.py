"""The server on a live loopback port: the openai client, raw HTTP, gradio_client, limits and 20 concurrent clients.

One uvicorn server (chat + API, tiny random model) is started in a thread for the whole module.
"""

from __future__ import annotations

import base64
import inspect
import io
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import free_port, random_image

from medllava.generation import SamplingParams
from medllava.processing import image_token_count
from serve.app import build_app, find_examples
from serve.engine import Busy, Engine, Limits

MODEL = "medllava"
LIMITS = Limits(
    concurrency=2,
    max_queue=32,
    max_new_tokens=256,
    default_new_tokens=12,
    max_images=3,
    max_image_bytes=300_000,
    max_image_pixels=1_000_000,
    max_messages=12,
    max_prompt_tokens=600,
)


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_keep_alive=60,
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, model_id=MODEL, limits=LIMITS)
    server, thread, url = start_server(build_app(engine, find_examples()))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_bytes(seed=0, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes | None = None, mime="image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data or png_bytes(), mime)}}


def ask(text: str, *parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        url + "/v1/chat/completions",
        content=content,
        timeout=60,
        headers={"content-type": "application/json"},
        **kwargs,
    )


def still_serving(url: str) -> None:
    r = post(url, {"model": MODEL, "messages": ask("Still there?"), "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


# ---------------------------------------------------------------------------------------------------------------
# openai client
# ---------------------------------------------------------------------------------------------------------------


def test_models_health_and_notice(live, client):
    url, _ = live
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert "not for clinical use" in models.data[0].model_extra["description"]
    health = httpx.get(url + "/health")
    assert health.json()["status"] == "ok"
    assert "not for clinical use" in health.headers["x-medllava-notice"]


def test_text_completion_with_usage(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Is there a mass?"), max_tokens=6)
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_image_as_data_url_adds_image_tokens(live, client):
    _, engine = live
    text_only = client.chat.completions.create(model=MODEL, messages=ask("What is shown?"), max_tokens=4)
    with_image = client.chat.completions.create(
        model=MODEL, messages=ask("What is shown?", image_part()), max_tokens=4
    )
    extra = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    n = image_token_count(engine.processor)
    assert n <= extra <= n + 2  # the image tokens plus the newline after the placeholder


def test_dicom_data_url_is_accepted(client):
    from pydicom.data import get_testdata_file

    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    reply = client.chat.completions.create(
        model=MODEL, messages=ask("Which modality?", image_part(dicom, "application/dicom")), max_tokens=4
    )
    assert reply.usage.prompt_tokens > 20


def test_streaming_equals_plain_completion(client):
    messages = ask("Describe the finding.", image_part(png_bytes(5)))
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=1)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert chunks[0].choices[0].delta.role == "assistant"


def test_raw_server_sent_events_end_with_done(live):
    url, _ = live
    body = {"model": MODEL, "messages": ask("Hello"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequence_cuts_the_answer(client):
    messages = ask("Tell me about the image.", image_part(png_bytes(2)))
    sampled = dict(model=MODEL, messages=messages, max_tokens=24, temperature=1.0, seed=3)
    full = client.chat.completions.create(**sampled).choices[0].message.content
    stop = full[6:9]
    assert len(full) > 12 and stop.strip(), full
    cut = client.chat.completions.create(**sampled, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**sampled, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]


def test_multi_turn_with_two_images(client):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        *ask("What is in the first image?", image_part(png_bytes(1))),
        {"role": "assistant", "content": "A chest radiograph."},
        *ask("And in this one?", image_part(png_bytes(2))),
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert reply.usage.prompt_tokens > 40


# ---------------------------------------------------------------------------------------------------------------
# Refusals: 4xx with a reason, and the server keeps serving
# ---------------------------------------------------------------------------------------------------------------


def _big_png() -> bytes:  # 1500 x 1000 = 1.5 M pixels (> 1 M limit) but a small file
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1500, 1000), (20, 20, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "medllava", "messages": [', 400, "not valid JSON"),
    "empty body": (b"", 400, "empty"),
    "not an object": ([1, 2], 400, "JSON object"),
    "no messages": ({"model": MODEL}, 400, "messages"),
    "no model": ({"messages": ask("hi")}, 400, "model"),
    "unknown model": ({"model": "gpt-9", "messages": ask("hi")}, 404, "not served here"),
    "tool role": ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported role"),
    "assistant first": (
        {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]},
        400,
        "start with",
    ),
    "ends with assistant": (
        {"model": MODEL, "messages": ask("q") + [{"role": "assistant", "content": "a"}]},
        400,
        "last message",
    ),
    "content null": (
        {"model": MODEL, "messages": [{"role": "user", "content": None}]},
        400,
        "string or a list",
    ),
    "audio part": (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        400,
        "unsupported content part",
    ),
    "http image url": (
        {
            "model": MODEL,
            "messages": ask("q", {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}),
        },
        400,
        "only data: URLs",
    ),
    "file path image": (
        {"model": MODEL, "messages": ask("q", {"type": "image_url", "image_url": {"url": "/etc/passwd"}})},
        400,
        "only data: URLs",
    ),
    "file url image": (
        {
            "model": MODEL,
            "messages": ask("q", {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}),
        },
        400,
        "only data: URLs",
    ),
    "bad base64": (
        {
            "model": MODEL,
            "messages": ask("q", {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}),
        },
        400,
        "not valid base64",
    ),
    "not an image": (
        {"model": MODEL, "messages": ask("q", image_part(b"hello, world" * 10))},
        400,
        "cannot read the image",
    ),
    "image too many bytes": (
        {"model": MODEL, "messages": ask("q", image_part(png_bytes(0, (400, 300))))},
        400,
        "limit",
    ),
    "image too many pixels": ({"model": MODEL, "messages": ask("q", image_part(_big_png()))}, 400, "pixels"),
    "too many images": (
        {"model": MODEL, "messages": ask("q", *[image_part()] * 4)},
        400,
        "more than 3 images",
    ),
    "too many messages": (
        {"model": MODEL, "messages": (ask("q") + [{"role": "assistant", "content": "a"}]) * 7 + ask("q")},
        400,
        "the limit is 12",
    ),
    "max_tokens over limit": (
        {"model": MODEL, "messages": ask("q"), "max_tokens": 100000},
        400,
        "max_tokens",
    ),
    "max_tokens zero": ({"model": MODEL, "messages": ask("q"), "max_completion_tokens": 0}, 400, "integer"),
    "temperature out of range": (
        {"model": MODEL, "messages": ask("q"), "temperature": 7},
        400,
        "temperature",
    ),
    "prompt too long": ({"model": MODEL, "messages": ask("word " * 800)}, 400, "the limit is 600"),
    "image token in text": ({"model": MODEL, "messages": ask("look <image> here")}, 400, "image token"),
    "n > 1": ({"model": MODEL, "messages": ask("q"), "n": 2}, 400, "n"),
    "unknown argument": ({"model": MODEL, "messages": ask("q"), "temprature": 0.5}, 400, "temprature"),
    "tools": ({"model": MODEL, "messages": ask("q"), "tools": [{"type": "function"}]}, 400, "not supported"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_4xx_json_and_server_keeps_serving(live, name):
    url, engine = live
    body, status, reason = BAD_REQUESTS[name]
    r = post(url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert reason.lower() in error["message"].lower()
    assert engine.pending == 0
    still_serving(url)


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError, match="only data: URLs"):
        client.chat.completions.create(
            model=MODEL,
            max_tokens=3,
            messages=ask("q", {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}),
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ask("q"), max_tokens=3)


def test_oversized_body_is_refused(live):
    url, engine = live
    r = post(url, b" " * (engine.limits.max_body_bytes + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    still_serving(url)


def test_full_queue_answers_429_then_recovers(live, client):
    url, engine = live
    tickets = [engine.admit() for _ in range(engine.limits.concurrency + engine.limits.max_queue)]
    try:
        with pytest.raises(Busy):
            engine.admit()
        r = post(url, {"model": MODEL, "messages": ask("q"), "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=ask("q"), max_tokens=3)
    finally:
        for ticket in tickets:
            ticket.close()
    assert engine.pending == 0
    still_serving(url)


# ---------------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------------


def test_twenty_concurrent_clients_get_their_own_answers(client):
    def request(i: int) -> str:
        messages = [
            {"role": "system", "content": f"Case marker {i * 7919}."},
            *ask(f"Question {i}: what do you see?", image_part(png_bytes(i % 3))),
        ]
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=1000 + i
        )
        return reply.choices[0].message.content

    sequential = [request(i) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        concurrent = list(pool.map(request, range(20)))
    assert concurrent == sequential
    assert len(set(sequential)) >= 15  # distinct markers and seeds give distinct answers: a swap would show


def test_client_leaving_a_stream_stops_its_generation(live):
    url, engine = live
    body = {
        "model": MODEL,
        "messages": ask("Describe at length."),
        "max_tokens": 256,
        "temperature": 1.0,
        "stream": True,
    }
    steps = []  # decoding steps; 20 ms each, so the full 256 tokens would take > 5 s

    def count(*_):
        steps.append(1)
        time.sleep(0.02)

    hook = engine.model.register_forward_pre_hook(count)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # the first event has arrived, then the client hangs up
        deadline = time.monotonic() + 30
        while engine.pending and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        hook.remove()
    assert engine.pending == 0
    assert len(steps) < 128, f"generation ran {len(steps)} steps after its client left"
    still_serving(url)


def test_closing_a_stream_early_stops_generation_and_frees_the_slot(live):
    _, engine = live
    before = set(threading.enumerate())
    pieces = engine.respond(
        [random_image()], ask("Describe.", {"type": "image"}), SamplingParams(max_new_tokens=64)
    )
    next(pieces)
    assert engine.pending == 1 and set(threading.enumerate()) - before  # the generation thread is running
    pieces.close()
    assert engine.pending == 0
    assert not set(threading.enumerate()) - before  # and has finished by the time close() returns


# ---------------------------------------------------------------------------------------------------------------
# Gradio chat through gradio_client
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def chat(live):
    from gradio_client import Client

    return Client(live[0] + "/", verbose=False)


def _png_file(tmp_path, seed: int) -> str:
    path = tmp_path / f"scan-{seed}.png"
    path.write_bytes(png_bytes(seed))
    return str(path)


SAMPLED = (
    1.0,
    1.0,
    8,
    7,
)  # temperature, top-p, max new tokens, seed: the random model's greedy answers are empty


def _say(chat, text: str, files=()):
    from gradio_client import handle_file

    return chat.predict({"text": text, "files": [handle_file(f) for f in files]}, *SAMPLED, api_name="/chat")


def _texts(history, role):
    out = []
    for message in history:
        if message["role"] == role:
            out += [c["text"] for c in message["content"] if c.get("type") == "text"]
    return out


def test_chat_two_turns_then_a_new_image_match_the_api(chat, client, tmp_path):
    first, second = _png_file(tmp_path, 11), _png_file(tmp_path, 12)
    _, history, preview, info = _say(chat, "Is there an abnormality?", [first])
    assert preview and "Image 1" in info
    files = [c for m in history for c in m["content"] if c.get("type") == "file"]
    assert len(files) == 1 and str(files[0]["file"]).endswith(".png") and "scan-11" not in str(files[0])
    _, history, _, _ = _say(chat, "Where exactly?")
    _, history, _, info = _say(chat, "Compare with this one.", [second])
    answers = _texts(history, "assistant")
    assert _texts(history, "user") == ["Is there an abnormality?", "Where exactly?", "Compare with this one."]
    assert len(answers) == 3 and "Image 2" in info

    # The chat and the API are one generation path: the same conversation gives the same answers, so the first
    # image stayed in context for the follow-up and both images for the last turn.
    def api(messages):
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=messages,
                temperature=SAMPLED[0],
                top_p=SAMPLED[1],
                max_tokens=SAMPLED[2],
                seed=SAMPLED[3],
            )
            .choices[0]
            .message.content
        )

    turn1 = ask("Is there an abnormality?", image_part(Path(first).read_bytes()))
    raw1 = api(turn1)
    turn2 = [*turn1, {"role": "assistant", "content": raw1}, *ask("Where exactly?")]
    raw2 = api(turn2)
    turn3 = [
        *turn2,
        {"role": "assistant", "content": raw2},
        *ask("Compare with this one.", image_part(Path(second).read_bytes())),
    ]
    expected = [raw1, raw2, api(turn3)]
    assert len(set(expected)) == 3
    assert [inspect.cleandoc(a) or "…" for a in expected] == answers  # gr.Chatbot shows text through cleandoc


def test_chat_sessions_are_isolated_and_clear_resets(live, tmp_path):
    from gradio_client import Client

    alice, bob = Client(live[0] + "/", verbose=False), Client(live[0] + "/", verbose=False)
    _say(alice, "Alice's question", [_png_file(tmp_path, 1)])
    _, history, preview, _ = _say(bob, "Bob's question")
    assert _texts(history, "user") == ["Bob's question"] and preview is None
    box, history, preview, info = alice.predict(api_name="/clear")
    assert history == [] and preview is None
    _, history, _, _ = _say(alice, "Fresh start")
    assert _texts(history, "user") == ["Fresh start"]


def test_chat_dicom_upload_shows_a_preview_without_identifiers(chat, tmp_path):
    from pydicom.data import get_testdata_file

    dicom = tmp_path / "upload.dcm"
    dicom.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    _, history, preview, info = _say(chat, "Which modality?", [str(dicom)])
    assert "DICOM" in info and "CT" in info
    shown = json.dumps(history) + info
    assert "CompressedSamples" not in shown and "upload.dcm" not in shown  # patient name, file name


def test_chat_refuses_unreadable_upload(chat, tmp_path):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(AppError, match="cannot be read"):
        _say(chat, "What is it?", [str(bad)])
    _, history, _, _ = _say(chat, "A text question instead")
    assert _texts(history, "user") == ["A text question instead"]


def test_retry_regenerates_and_undo_removes_the_last_turn(chat, tmp_path):
    _say(chat, "First question", [_png_file(tmp_path, 3)])
    _, history, _, _ = _say(chat, "Second question")
    _, retried, _, _ = chat.predict(*SAMPLED, api_name="/retry")
    assert _texts(retried, "assistant") == _texts(history, "assistant")  # greedy: the same answer again
    box, history, _, _ = chat.predict(api_name="/undo")
    assert box["text"] == "Second question" and _texts(history, "user") == ["First question"]


def test_stop_button_ends_the_answer_early(live, tmp_path):
    from gradio_client import Client, handle_file

    image = _png_file(tmp_path, 9)
    value = {"text": "Describe everything.", "files": [handle_file(image)]}
    sampled = (1.0, 1.0, 96, 5)
    full = Client(live[0] + "/", verbose=False).predict(value, *sampled, api_name="/chat")[1]
    # The tiny model writes all 96 tokens before a Stop request lands, and a fixed slowdown of its steps can be
    # outrun on a busy machine (a sleep per step lasts as long under load; the HTTP round trips of the streamed
    # answer and of the Stop do not). So from its fourth forward on, the model waits until Stop has been pressed:
    # the answer cannot end before the Stop lands, and ends within a step after it.
    pressed, forwards = threading.Event(), itertools.count()

    def hold(*_) -> None:
        if next(forwards) >= 3:
            pressed.wait(60)

    held = live[1].model.register_forward_pre_hook(hold)
    try:
        chat = Client(live[0] + "/", verbose=False)
        job = chat.submit(value, *sampled, api_name="/chat")
        deadline = time.monotonic() + 30
        while len(job.outputs()) < 2 and time.monotonic() < deadline:  # streaming has begun
            time.sleep(0.01)
        shown = job.outputs()
        assert shown and _texts(shown[-1][1], "assistant"), f"no answer began streaming: {shown}"
        chat.predict(api_name="/stop")
        pressed.set()
        stopped = job.result()[1]
    finally:
        pressed.set()
        held.remove()
    # gr.Chatbot shows text through inspect.cleandoc, which may re-indent lines: compare with whitespace collapsed
    full_answer, stopped_answer = (" ".join(_texts(h, "assistant")[0].split()) for h in (full, stopped))
    assert full_answer.startswith(stopped_answer) and len(stopped_answer) < len(full_answer), (full, stopped)


def test_examples_fall_back_to_packaged_images(monkeypatch):
    import serve.app

    monkeypatch.setattr(serve.app, "SHIPPED_EXAMPLES", Path("/nonexistent/shipped.jsonl"))
    examples = find_examples(Path("/nonexistent/vqa_test.jsonl"))
    assert examples and all(Path(e["files"][0]).is_file() and e["text"] for e in examples)
    assert any(e["files"][0].endswith(".dcm") for e in examples)


def test_examples_without_medsynth_come_from_the_shipped_test_cases():
    from serve.app import SHIPPED_EXAMPLES

    examples = find_examples(Path("/nonexistent/vqa_test.jsonl"))
    shipped = [json.loads(line) for line in SHIPPED_EXAMPLES.read_text().splitlines()]
    assert [e["text"] for e in examples] == [r["messages"][0]["content"][-1]["text"] for r in shipped][:4]
    assert all(Path(e["files"][0]).is_file() for e in examples)


def test_cli_help_and_bad_model_dir(tmp_path, capsys):
    from serve.__main__ import main, parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0 and "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--model", str(tmp_path)])


def test_access_log_never_shows_uploaded_file_names():
    import logging

    from serve.__main__ import RedactFileNames

    path = "/gradio_api/file%3D/tmp/gradio/abc/Jane_Doe_1961.dcm"
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", path, "1.1", 200),
        None,
    )
    assert RedactFileNames().filter(record)
    assert "Jane" not in record.getMessage() and "file%3D<redacted>" in record.getMessage()
