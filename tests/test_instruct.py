"""Stage-2 instruction generation against a real OpenAI-compatible HTTP server on loopback (no mocked client).

`ChatServer` is a small stdlib HTTP server answering POST /v1/chat/completions with realistic replies; it can
fail on demand (429/500) to exercise retries and hold a request to let a test kill the client mid-run.
A slow test runs the same pipeline against our own `python -m serve` on a tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, random_image

from data_pipelines import instruct
from medllava.schema import read_rows, validate_row

ROOT = Path(__file__).resolve().parents[1]

GOOD_REPLY = (
    "Sure, here is the conversation.\n\n"
    "**User:** What type of image is this?\n"
    "**Assistant:** It is a chest radiograph taken from the front.\n"
    "User: Is there anything abnormal?\n"
    "Assistant: Yes, there is a rounded opacity in the right lower zone,\n"
    "about 3 cm across.\n"
    "User: What might it be?"
)
LEAK_REPLY = "User: What is shown?\nAssistant: As the caption says, a fracture of the left tibia."
GARBAGE_REPLY = "I am sorry, I cannot help with that request."


class ChatServer:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol."""

    def __init__(self):
        self.bodies: list[dict] = []  # every POST body received, in order
        self.answered: list[dict] = []  # bodies answered with 200
        self.fail_codes: list[int] = []  # status codes to return for the next requests
        self.hold_from: int | None = None  # hold requests number >= this (1-based) until released
        self.release = threading.Event()
        self.held = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    number = len(server.bodies)
                    code = server.fail_codes.pop(0) if server.fail_codes else 200
                if server.hold_from is not None and number >= server.hold_from:
                    server.held.set()
                    server.release.wait(60)
                    return
                if code != 200:
                    payload = json.dumps({"error": {"message": "try later", "type": "rate_limit"}}).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("retry-after-ms", "20")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                source = body["messages"][-1]["content"]
                text = (
                    LEAK_REPLY if "LEAK" in source else GARBAGE_REPLY if "GARBAGE" in source else GOOD_REPLY
                )
                payload = json.dumps(
                    {
                        "id": f"chatcmpl-{number}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": 100 + number,
                            "completion_tokens": 40,
                            "total_tokens": 140 + number,
                        },
                    }
                ).encode()
                with server.lock:
                    server.answered.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def write_items(tmp_path: Path, captions: list[str]) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, caption in enumerate(captions):
        random_image(i).save(images / f"fig{i}.png")
        records.append(
            {
                "pair_id": f"p{i}",
                "image": f"images/fig{i}.png",
                "fig_caption": caption,
                "in_text_mention": [{"tokens": f"Figure {i} shows the finding."}],
            }
        )
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def gen_args(path: Path, out: Path, url: str, *extra: str, model: str = "test-model") -> list[str]:
    return [
        "generate",
        "--input",
        str(path),
        "--output",
        str(out),
        "--base-url",
        url,
        "--model",
        model,
        "--api-key",
        "k",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def test_parse_conversation_is_robust():
    pairs, problem = instruct.parse_conversation(GOOD_REPLY)
    assert problem is None
    assert pairs[0] == ("What type of image is this?", "It is a chest radiograph taken from the front.")
    assert pairs[1][1].endswith("about 3 cm across.")  # multi-line turn kept
    assert len(pairs) == 2  # the final unanswered question is dropped
    pairs, _ = instruct.parse_conversation(
        "1. Q: Which organ?\n2. A: The liver.\n- Human: Size?\n- GPT: 2 cm."
    )
    assert pairs == [("Which organ?", "The liver."), ("Size?", "2 cm.")]
    for bad, reason in [
        (GARBAGE_REPLY, "no 'User:'"),
        ("", "empty reply"),
        ("Assistant: hello\nUser: hi", "starts with an assistant"),
        ("User: a question?", "no complete"),
        ("User: q\nAssistant:\nUser: x", "empty answer"),
    ]:
        assert instruct.parse_conversation(bad) == ([], instruct.parse_conversation(bad)[1])
        assert reason in instruct.parse_conversation(bad)[1]


def test_repetitive_replies_are_rejected():
    looping = "User: What is it?\nAssistant: A CT.\nUser: What is it ?\nAssistant: A CT."
    pairs, problem = instruct.parse_conversation(looping)
    assert problem is None and instruct.repetition_problem(pairs).startswith("repetitive reply")
    assert instruct.repetition_problem(instruct.parse_conversation(GOOD_REPLY)[0]) is None


@pytest.mark.parametrize(
    "text",
    [
        "As the caption says, a mass.",
        "The figure legend mentions it.",
        "As described in the text, it is benign.",
        "According to the authors, yes.",
    ],
)
def test_leak_filter_catches_caption_talk(text):
    assert instruct.leak_problem([("What is it?", text)]).startswith("leaks the source text")
    assert instruct.leak_problem([("What is it?", "A rounded mass in the left lobe.")]) is None


def test_request_key_is_stable_and_sensitive():
    body = {"model": "m", "messages": instruct.build_messages("cap", ["m1"]), "temperature": 0.7}
    assert instruct.request_key(body) == instruct.request_key(json.loads(json.dumps(body)))
    assert instruct.request_key(body) != instruct.request_key({**body, "temperature": 0.2})


# ---------------------------------------------------------------------------------------------------------------
# Against the loopback server
# ---------------------------------------------------------------------------------------------------------------


def test_generate_end_to_end_with_cache_and_filters(tmp_path, server, capsys):
    path = write_items(tmp_path, ["CT of the chest.", "LEAK this one.", "GARBAGE here.", "MRI of the knee."])
    out = tmp_path / "out" / "stage2.jsonl"
    assert instruct.main(gen_args(path, out, server.url, "--workers", "2")) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["instruct-p0", "instruct-p3"]
    for row in rows:
        assert validate_row(row, out.parent) == []
        assert len(row["messages"]) == 4 and row["messages"][0]["content"][0] == {"type": "image"}
    rejected = read_rows(out.with_suffix(".rejected.jsonl"))
    reasons = sorted(r["reasons"][0] for r in rejected)
    assert reasons[0].startswith("leaks the source text: 'caption'") and reasons[1].startswith("no 'User:'")
    stats = json.loads(out.with_name("stage2.jsonl.stats.json").read_text())
    assert stats["new_requests"] == 4 and stats["completion_tokens"] == 160
    assert stats["prompt_tokens"] == sum(100 + n for n in range(1, 5))
    sent = server.bodies[0]
    assert sent["model"] == "test-model" and sent["messages"][0]["role"] == "system"
    assert len(sent["messages"]) == 2 + 2 * len(instruct.FEW_SHOT)
    sources = sorted(b["messages"][-1]["content"] for b in server.bodies)
    assert (
        sources[0]
        == "Figure caption:\nCT of the chest.\n\nSentences referring to the figure:\n- Figure 0 shows the finding."
    )
    # a rerun is served from the cache: the server sees nothing new, the output is identical
    before = out.read_text()
    assert instruct.main(gen_args(path, out, server.url)) == 0
    assert len(server.bodies) == 4 and out.read_text() == before
    stats = json.loads(out.with_name("stage2.jsonl.stats.json").read_text())
    assert stats["new_requests"] == 0 and stats["cached_requests"] == 4


def test_retries_429_and_500(tmp_path, server):
    path = write_items(tmp_path, ["CT of the chest."])
    server.fail_codes = [429, 500, 503]
    out = tmp_path / "o.jsonl"
    assert instruct.main(gen_args(path, out, server.url, "--retries", "3")) == 0
    assert len(server.bodies) == 4 and len(read_rows(out)) == 1


def test_failed_requests_are_reported_and_retried_on_rerun(tmp_path, server):
    path = write_items(tmp_path, ["CT of the chest."])
    server.fail_codes = [500, 500]
    out = tmp_path / "o.jsonl"
    assert instruct.main(gen_args(path, out, server.url, "--retries", "1")) == 1
    assert read_rows(out) == []
    assert "request failed" in read_rows(out.with_suffix(".rejected.jsonl"))[0]["reasons"][0]
    assert instruct.main(gen_args(path, out, server.url, "--retries", "1")) == 0
    assert len(read_rows(out)) == 1


def test_kill_and_resume_never_repeats_a_finished_request(tmp_path, server):
    n = 6
    path = write_items(tmp_path, [f"Radiograph number {i} of the hand." for i in range(n)])
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "cache"
    server.hold_from = 3  # requests 1-2 are answered; the 3rd hangs until the client is killed
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.instruct",
        *gen_args(path, out, server.url, "--workers", "1", "--cache", str(cache)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.held.wait(60), (
            proc.stderr.read().decode() if proc.poll() is not None else "no 3rd request"
        )
        deadline = time.time() + 30
        while len(instruct.ResponseCache(cache)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    finished = [instruct.request_key(b) for b in server.answered]
    assert len(finished) == 2 and len(instruct.ResponseCache(cache)) == 2
    server.hold_from = None
    server.release.set()
    seen_before = len(server.bodies)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resent = [instruct.request_key(b) for b in server.bodies[seen_before:]]
    assert not set(resent) & set(finished)  # nothing finished before the kill was sent again
    assert len(resent) == n - 2 and len(set(resent)) == n - 2
    assert len(read_rows(out)) == n
    assert "| 6 " in rerun.stdout


def test_convert_llava_med_instruct_layout(tmp_path):
    (tmp_path / "imgs").mkdir()
    random_image().save(tmp_path / "imgs" / "a.jpg")
    records = [
        {
            "id": "r1",
            "image": "imgs/a.jpg",
            "conversations": [
                {"from": "human", "value": "What is shown?\n<image>"},
                {"from": "gpt", "value": "A chest CT."},
                {"from": "human", "value": "Any effusion?"},
                {"from": "gpt", "value": "A small left effusion."},
            ],
        },
        {
            "id": "r2",
            "image": "imgs/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "The caption says CT."},
            ],
        },
        {
            "id": "r3",
            "image": "imgs/missing.jpg",
            "conversations": [{"from": "human", "value": "<image>\nQ"}],
        },
        {
            "id": "r4",
            "image": "imgs/a.jpg",
            "conversations": [{"from": "human", "value": "<image> Q?"}, {"from": "human", "value": "Q2?"}],
        },
    ]
    src = tmp_path / "llava_med_instruct_60k_inline_mention.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out" / "train.jsonl"
    assert instruct.main(["convert", "--input", str(src), "--output", str(out)]) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["llava_med_instruct-r1"]
    assert validate_row(rows[0], out.parent) == []
    assert rows[0]["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What is shown?"},
    ]
    reasons = [r["reasons"][0] for r in read_rows(out.with_suffix(".rejected.jsonl"))]
    assert (
        reasons[0].startswith("leaks")
        and reasons[1].startswith("image not found")
        and "alternate" in reasons[2]
    )


@pytest.mark.slow
def test_generate_against_our_serve_server(tmp_path, tiny_model_dir):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(1)
        path = write_items(tmp_path, ["CT of the chest.", "MRI of the knee."])
        out = tmp_path / "o.jsonl"
        code = instruct.main(
            gen_args(
                path,
                out,
                f"http://127.0.0.1:{port}/v1",
                "--max-tokens",
                "16",
                "--workers",
                "1",
                model="medllava",
            )
        )
        stats = json.loads(out.with_name("o.jsonl.stats.json").read_text())
        # The tiny random model writes noise: every reply is parsed and either kept or rejected with a reason.
        assert code == 0 and stats["new_requests"] == 2 and stats["failed_requests"] == 0
        assert stats["rows"] + stats["unparseable"] + stats["leaked"] == 2
        assert stats["completion_tokens"] > 0
        assert (
            instruct.main(
                gen_args(path, out, f"http://127.0.0.1:{port}/v1", "--max-tokens", "16", model="medllava")
            )
            == 0
        )
        assert json.loads(out.with_name("o.jsonl.stats.json").read_text())["cached_requests"] == 2
    finally:
        server.terminate()
        server.wait(30)
