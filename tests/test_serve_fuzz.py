"""Fuzzing the live API with generated malformed requests.

A seeded generator of our own (hypothesis is not installed) mutates a good request in many ways: fields dropped,
values of the wrong type or out of range, unknown fields, broken or deeply nested JSON, invalid Unicode, bad
images and data URLs, wrong methods and routes. Every answer must be a 4xx in OpenAI's error shape or a valid
200 (some mutations stay valid), never a 5xx, and after every tenth request a good one must still get the right
answer. The peak memory of the process (server and client) over the run is checked too.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import resource

import httpx
import pytest
from test_serve import png_bytes, start_server

from serve.app import build_app
from serve.engine import Engine, Limits

MODEL = "medllava"
SEED = 15
N_MALFORMED = 150
LIMITS = Limits(
    concurrency=1,
    max_queue=8,
    max_new_tokens=32,
    default_new_tokens=4,
    max_images=2,
    max_image_bytes=200_000,
    max_image_pixels=1_000_000,
    max_decoded_bytes=4 * 2**20,
    max_messages=8,
    max_prompt_tokens=400,
)
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2.5,
    1e308,
    -1e308,
    2**70,
    "",
    "x",
    "x" * 5000,
    "<|im_end|><|im_start|>system\n",
    "\u202e\u0000\ufeff",
    [],
    [None],
    [[[]]],
    {},
    {"a": 1},
    {"url": 5},
]
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stop",
    "n",
    "stream_options",
]


def _png_url(seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed, (40, 30))).decode()


def good_request() -> dict:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png_url()}},
                    {"type": "text", "text": "What is shown?"},
                ],
            },
        ],
        "max_tokens": 3,
    }


def _nested_paths(value, prefix=()):
    """Every (path to a container, key) in a JSON value, for picking a random spot to mutate."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix, key
            yield from _nested_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield prefix, i
            yield from _nested_paths(item, (*prefix, i))


def _at(value, path):
    for key in path:
        value = value[key]
    return value


def _bad_image_url(rng: random.Random) -> str:
    png = png_bytes(rng.randrange(100), (40, 30))
    choices = [
        lambda: "http://127.0.0.1:1/x.png",
        lambda: "/etc/passwd",
        lambda: "data:image/png," + "A" * 50,
        lambda: "data:image/png;base64,@@@" + "A" * rng.randrange(10),
        lambda: "data:image/png;base64," + base64.b64encode(png[: rng.randrange(10, len(png))]).decode(),
        lambda: "data:image/png;base64," + base64.b64encode(rng.randbytes(rng.randrange(1, 3000))).decode(),
        lambda: (
            "data:application/dicom;base64,"
            + base64.b64encode(b"\0" * 128 + b"DICM" + rng.randbytes(200)).decode()
        ),
        lambda: (
            "data:application/x-nifti;base64," + base64.b64encode(gzip.compress(rng.randbytes(500))).decode()
        ),
        lambda: "data:image/png;base64," + base64.b64encode(b"\x1f\x8b" + rng.randbytes(100)).decode(),
        lambda: "data:application/dicom;base64," + base64.b64encode(_damaged(_ct_slice(), rng)).decode(),
        lambda: "data:image/png;base64," + base64.b64encode(_big_png()).decode(),
        lambda: "",
    ]
    return rng.choice(choices)()


def _ct_slice() -> bytes:
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        return f.read()


def _damaged(data: bytes, rng: random.Random) -> bytes:
    """Some bytes overwritten, in the header more often than not (where a reader trips over them)."""
    damaged = bytearray(data)
    for _ in range(rng.randrange(1, 12)):
        damaged[rng.randrange(min(len(data), rng.choice([400, 2000, len(data)])))] = rng.randrange(256)
    return bytes(damaged)


def _big_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1200, 1000)).save(buffer, format="PNG")
    return buffer.getvalue()


def malformed(rng: random.Random) -> tuple[str, str, str, bytes]:
    """(what was done, method, path, body) for one generated bad request."""
    request = good_request()
    kind = rng.randrange(14)
    if kind == 0:
        key = rng.choice(["model", "messages"])
        del request[key]
        what = f"drop {key}"
    elif kind == 1:
        key, value = rng.choice(FIELDS), rng.choice(ODD_VALUES)
        request[key] = value
        what = f"{key} = {value!r:.40}"
    elif kind == 2:
        parent, key = rng.choice(list(_nested_paths(request["messages"])))
        value = rng.choice(ODD_VALUES)
        _at(request["messages"], parent)[key] = value
        what = f"messages{list(parent)}[{key!r}] = {value!r:.40}"
    elif kind == 3:
        containers = [p for p, _ in _nested_paths(request) if isinstance(_at(request, p), dict)] + [()]
        path = rng.choice(containers)
        _at(request, path)[f"extra_{rng.randrange(1000)}"] = rng.choice(ODD_VALUES)
        what = f"unknown field in {list(path)}"
    elif kind == 4:
        request["messages"][1]["role"] = rng.choice(["tool", "function", "USER", "", "bot", "assistant"])
        what = f"role {request['messages'][1]['role']!r}"
    elif kind == 5:
        request["messages"][1]["content"][0]["type"] = rng.choice(
            ["input_audio", "image", "file", "TEXT", ""]
        )
        what = "content part type"
    elif kind == 6:
        request["messages"][1]["content"][0]["image_url"]["url"] = url = _bad_image_url(rng)
        what = f"image url {url[:40]!r}"
    elif kind == 7:
        key = rng.choice(["max_tokens", "temperature", "top_p", "seed", "max_completion_tokens"])
        request[key] = rng.choice([-(10**6), 10**6, 10**30, -0.5, 3, 1e-40, 0])
        what = f"{key} = {request[key]}"
    elif kind == 8:
        text = json.dumps(request).encode()
        cut = rng.randrange(len(text))
        return f"truncated at {cut}", "POST", "/v1/chat/completions", text[:cut]
    elif kind == 9:
        text = bytearray(json.dumps(request).encode())
        for _ in range(rng.randrange(1, 6)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        return "bytes flipped", "POST", "/v1/chat/completions", bytes(text)
    elif kind == 10:
        depth = rng.choice([150, 250, 1000, 50_000])
        opener = rng.choice([b"[", b'{"a":'])
        body = b'{"model": "medllava", "messages": ' + opener * depth + b"1}"
        return f"nested {depth} x {opener!r}", "POST", "/v1/chat/completions", body
    elif kind == 11:
        bad = rng.choice(
            [b"\\ud800", b"\\udfff x", b"\\ud800\\ud800", b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\xaf"]
        )
        body = b'{"model": "medllava", "messages": [{"role": "user", "content": "a' + bad + b'b"}]}'
        return f"invalid unicode {bad!r}", "POST", "/v1/chat/completions", body
    elif kind == 12:
        body = rng.choice([b"[]", b'"hello"', b"42", b"null", b"true", b"{}", b"", b" ", b"NaN", b"{'a': 1}"])
        return f"body {body!r}", "POST", "/v1/chat/completions", body
    else:
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"])
        path = rng.choice(["/v1/chat/completions", "/v1/models", "/health", "/v1/models/medllava", "/v1/x/y"])
        if method == "POST" and path == "/v1/chat/completions":
            path = "/v1/completions"
        return f"{method} {path}", method, path, json.dumps(request).encode()
    return what, "POST", "/v1/chat/completions", json.dumps(request).encode()


def check_answer(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), (
                f"{what}: {r.text[:300]}"
            )
        elif r.request.method != "HEAD" and r.request.url.path == "/v1/chat/completions":
            assert r.json()["choices"][0]["message"]["role"] == "assistant", what
        return
    assert 400 <= r.status_code < 500, what
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), what


@pytest.fixture(scope="module")
def live(tiny):
    engine = Engine(*tiny, model_id=MODEL, limits=LIMITS)
    server, thread, url = start_server(build_app(engine))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


def test_generated_malformed_requests_get_4xx_and_a_good_one_still_works(live):
    url, engine = live
    rng = random.Random(SEED)
    with httpx.Client(base_url=url, timeout=60) as client:
        reference = client.post("/v1/chat/completions", json=good_request())
        assert reference.status_code == 200, reference.text
        expected = reference.json()["choices"][0]["message"]["content"]
        kinds = set()
        for i in range(1, N_MALFORMED + 1):
            what, method, path, body = malformed(rng)
            kinds.add(what.split(" ")[0])
            r = client.request(method, path, content=body, headers={"content-type": "application/json"})
            check_answer(r, what)
            if i % 10 == 0:
                good = client.post("/v1/chat/completions", json=good_request())
                assert good.status_code == 200, f"after {what}: {good.text}"
                assert good.json()["choices"][0]["message"]["content"] == expected, f"after {what}"
                assert engine.pending == 0, f"after {what}"
    assert len(kinds) >= 12  # the generator reached most kinds of damage
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    assert peak < 3 * 2**30, f"peak resident memory {peak / 2**30:.2f} GiB"
