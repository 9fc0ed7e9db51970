"""Time to first token and decode speed of one image question, streamed through the OpenAI-compatible API.

Usage:
    python -m bench.serve_latency                                   # default model, float32, 3 repetitions
    python -m bench.serve_latency --dtype bfloat16 --reps 5 --max-tokens 64
    python -m bench.serve_latency --url http://127.0.0.1:7860       # an already running server

Starts `python -m serve` in a subprocess on a free loopback port (unless --url is given), asks one question about
a real fundus photograph (scikit-image's retina.jpg) with `stream: true`, and prints a markdown table: time to first
token (request sent -> first non-empty content chunk: queueing, image preprocessing, vision tower and prefill),
decode speed (completion tokens after the first / time from first to last chunk) and the whole request. One
warm-up request is not counted. The same question then runs through `medllava.generation.stream` in this process
(no server, no HTTP) as a baseline, so the server's own cost shows even on a busy machine. The 1-minute load average is printed beside it: the machine is shared, so other
work can slow every figure.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from medllava.assets import resolve_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "serve",
        "--model",
        model,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-examples",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"the server exited with code {process.returncode}:\n{process.stderr.read()[-3000:]}"
            )
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"the server did not answer {url}/health within {timeout:.0f} s")


def image_data_url(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def one_request(url: str, model: str, image: str, question: str, max_tokens: int) -> dict:
    import json

    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }
    start = time.perf_counter()
    first = last = None
    usage = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise SystemExit(f"request failed ({response.status_code}): {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    decode = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else float("nan")
    return {
        "ttft": (first or end) - start,
        "decode": decode,
        "total": end - start,
        "tokens": tokens,
        "prompt": usage.get("prompt_tokens", 0),
    }


def in_process(
    model_dir: str, dtype: str, image_path: Path, question: str, max_tokens: int, reps: int
) -> list[dict]:
    """The same question through `medllava.generation.stream` in this process: the speed without the server."""
    from medllava.generation import SamplingParams, load, stream
    from medllava.processing import load_image
    from medllava.schema import message

    model, processor = load(model_dir, dtype=dtype)
    example = {"images": [load_image(image_path)], "messages": [message("user", question, 1)]}
    runs = []
    for i in tqdm(range(reps + 1), desc="in-process", file=sys.stderr):
        usage: dict = {}
        start = time.perf_counter()
        first = last = None
        for _ in stream(
            model,
            processor,
            example,
            SamplingParams(max_new_tokens=max_tokens),
            images_loaded=True,
            usage=usage,
        ):
            last = time.perf_counter()
            first = first or last
        end = time.perf_counter()
        tokens = usage["completion_tokens"]
        if i:  # the first is a warm-up
            runs.append(
                {
                    "ttft": (first or end) - start,
                    "total": end - start,
                    "tokens": tokens,
                    "prompt": usage["prompt_tokens"],
                    "decode": (tokens - 1) / (last - first)
                    if first and last and last > first
                    else float("nan"),
                }
            )
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_latency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="default", help="what `python -m serve --model` gets")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--served-model-name", default="medllava")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--question", default="Describe this image.")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the same question through medllava.generation.stream in this process",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    import skimage

    image_path = Path(skimage.__file__).parent / "data" / "retina.jpg"
    image = image_data_url(image_path)
    process = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        print(f"starting python -m serve --model {args.model} --dtype {args.dtype} ...", file=sys.stderr)
        process, url = start_server(args.model, args.dtype)
    try:
        load = os.getloadavg()[0]
        one_request(url, args.served_model_name, image, args.question, args.max_tokens)  # warm-up
        runs = [
            one_request(url, args.served_model_name, image, args.question, args.max_tokens)
            for _ in tqdm(range(args.reps), desc="requests", file=sys.stderr)
        ]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    rows = [(f"API {i}", run) for i, run in enumerate(runs, 1)] + [("API median", median(runs))]
    if not args.no_baseline and not args.url:
        local = in_process(
            resolve_model(args.model), args.dtype, image_path, args.question, args.max_tokens, args.reps
        )
        rows.append(("in-process median", median(local)))
    load_after = os.getloadavg()[0]

    command = "python -m bench.serve_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n`{command.strip()}`: {args.model}, {args.dtype}, {os.cpu_count()} CPU cores; 1-min load average "
        f"{load:.2f} before and {load_after:.2f} after (this benchmark alone keeps it near 1 on 2 cores: "
        "higher means other work shared the CPU and the figures are pessimistic)\n"
    )
    print(
        "| run | prompt tokens | completion tokens | time to first token (s) | decode (tok/s) | total (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, run in rows:
        print(
            f"| {name} | {run['prompt']} | {run['tokens']} | {run['ttft']:.2f} | {run['decode']:.1f} | "
            f"{run['total']:.2f} |"
        )


def median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


if __name__ == "__main__":
    main()
