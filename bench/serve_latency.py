"""Serving speed: streaming overhead against plain `model.generate`, the dtype, and concurrent clients batched.

Usage:
    python -m bench.serve_latency                      # base model, float32 and bfloat16, 1/4/8/16 clients
    python -m bench.serve_latency --model default --dtypes bfloat16 --clients 1 8 --max-tokens 32 --requests 3
    python -m bench.serve_latency --url http://127.0.0.1:7860 --clients 1 4    # a running server: sweep only

Starts `python -m serve` on a free loopback port (unless --url is given) and prints three markdown tables, every
ratio measured in the same run:

1. Streaming overhead, per dtype. One client streams an image question (scikit-image's retina.jpg, `--question`)
   through the API, and the same prompt runs through plain `model.generate` in this process (same model, dtype and
   greedy decoding; a streamer that only notes the time of each token). One server per dtype runs throughout and
   all arms of all dtypes take turns, `--reps` times after a warm-up, so a change in the machine's load hits them
   alike. Decode rate = tokens after the first / (last token - first token); time to first token (TTFT) =
   request sent (call made) -> first token. `generate` runs on a worker thread, as the server's decoding loop
   does: on a loaded machine OpenMP's spin-waiting makes the main thread's decode several times slower
   (docs/serve.md). Then `--equality` different greedy prompts are asked one at a time and then all at once: how
   many answers under load are the same as alone.
2. The serving dtype: the fastest streamed decode among the dtypes whose answers under load were all the same as
   alone (else the fastest), or `--serve-dtype`.
3. Concurrency sweep with that dtype (server started with `--concurrency` = the most clients): N clients each ask
   `--requests` questions back to back (different questions and images, so different prompts); client k sends its
   first request k/N of a single request's duration after the start. Measured in the steady state, while all N
   clients are active (from the moment every client has had its first answer to the moment the first one has had
   its last): aggregate tokens/s = text tokens streamed in that window / its length; TTFT p50/p95 over every
   request but each client's first (those arrive as a burst); ratios to the 1-client row. Every client count runs
   `--rounds` times, in alternating order (1, 4, 8, 16, then 16, 8, 4, 1), and the medians are shown.

The machine load (`bench.common.machine_state`) is printed before and after: on a shared machine every absolute
figure is low and noisy, so look at the ratios; re-run on a quiet machine for absolute speeds. Medians everywhere.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The OpenMP policy `python -m serve` sets (idle threads sleep), here too before torch loads: both arms run under it.
# The server inherits this environment, so OMP_WAIT_POLICY=ACTIVE python -m bench.serve_latency compares the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402

from bench.common import machine_state  # noqa: E402
from medllava.assets import resolve_model  # noqa: E402
from medllava.reports import markdown_table  # noqa: E402

QUESTIONS = [
    "Describe this image.",
    "Describe this image in detail.",
    "What kind of image is this? Describe what you see.",
    "Which structures are visible in this image?",
    "Is there anything abnormal in this image? Explain.",
    "Write a short report about this image.",
    "What colours and shapes do you see?",
    "What imaging modality is this, and which part of the body does it show?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, dtype: str, concurrency: int, timeout: float = 900
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--model", model, "--dtype", dtype, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-examples", "--concurrency", str(concurrency)]
    cmd += ["--max-queue", str(max(16, concurrency))]
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


def stop_server(process: subprocess.Popen | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(timeout=60)


def images() -> list[tuple[str, Path]]:
    """(mime, path) of real images shipped by installed packages: two fundus photographs and a CT slice."""
    import skimage
    from pydicom.data import get_testdata_file

    data = Path(skimage.__file__).parent / "data"
    return [
        ("image/jpeg", data / "retina.jpg"),
        ("image/png", data / "microaneurysms.png"),
        ("application/dicom", Path(get_testdata_file("CT_small.dcm"))),
    ]


def data_url(mime: str, path: Path) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def stream_request(
    client: httpx.Client, url: str, model: str, image: str, question: str, max_tokens: int
) -> dict:
    """One streamed request: TTFT, decode rate (from token chunk times) and the usage the server reports."""
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
    stamps, usage, finish, text = [], {}, None, ""
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=1800) as response:
        if response.status_code != 200:
            raise SystemExit(f"request failed ({response.status_code}): {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                finish = chunk["choices"][0]["finish_reason"] or finish
                if chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text += chunk["choices"][0]["delta"]["content"]
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    run = timing(start, stamps, end, tokens - (finish == "stop"), tokens, usage.get("prompt_tokens", 0))
    return {**run, "text": text, "stamps": stamps, "start": start, "end": end}


def timing(start: float, stamps: list[float], end: float, text_tokens: int, tokens: int, prompt: int) -> dict:
    """`stamps`: when text arrived (a piece per token, or several tokens in one piece if the reader fell behind);
    `text_tokens`: the tokens that carry text (all but an end-of-turn token). Decode rate = text tokens after the
    first / (last arrival - first arrival)."""
    decode = (text_tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    ttft = (stamps[0] if stamps else end) - start
    return {"ttft": ttft, "decode": decode, "total": end - start, "tokens": tokens, "prompt": prompt}


class _Stamps:
    """A `generate` streamer that notes when each token comes and does nothing else (no decoding, no queue)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bare_generate(model_dir: str, dtype: str, question: str, max_tokens: int):
    """A function running the same prompt through plain `model.generate` (greedy) on a worker thread."""
    import torch

    from medllava.generation import _end_ids, load
    from medllava.processing import encode, load_image
    from medllava.schema import message

    model, processor = load(model_dir, dtype=dtype)
    example = {"images": [load_image(images()[0][1])], "messages": [message("user", question, 1)]}
    batch = encode(processor, [example], add_generation_prompt=True, images_loaded=True)
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    end_ids = sorted(_end_ids(model, processor))

    def run() -> dict:
        streamer, out = _Stamps(), {}

        def work():
            with torch.inference_mode():
                out["ids"] = model.generate(
                    **batch,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=end_ids,
                    pad_token_id=processor.tokenizer.pad_token_id,
                    streamer=streamer,
                )

        start = time.perf_counter()
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        end = time.perf_counter()
        new = out["ids"][0, batch["input_ids"].shape[1] :].tolist()
        stamps = streamer.times[1:]  # the first put is the prompt
        n = next((i for i, t in enumerate(new) if t in end_ids), len(new))  # tokens with text
        return timing(start, stamps[:n], end, n, len(new), batch["input_ids"].shape[1])

    return run


def median(runs: list[dict]) -> dict:
    numbers = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    return {key: statistics.median(run[key] for run in runs) for key in numbers}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    low, high = int(k), min(int(k) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


def overhead(args, model_dir: str) -> list[dict]:
    """Table 1: for every dtype, the API's single stream against plain `generate`, all arms taking turns (one
    server per dtype runs throughout), so that a change in the machine's load hits every arm alike."""
    servers, arms = {}, {}
    try:
        for dtype in args.dtypes:
            print(f"[{dtype}] starting python -m serve --model {args.model} ...", file=sys.stderr, flush=True)
            servers[dtype] = start_server(args.model, dtype, max(1, args.equality))
            arms[dtype] = bare_generate(model_dir, dtype, args.question, args.max_tokens)
        image = data_url(*images()[0])
        api, plain, same = {d: [] for d in args.dtypes}, {d: [] for d in args.dtypes}, {}
        with httpx.Client() as client:
            for rep in range(args.reps + 1):  # the first of each is a warm-up
                for dtype in args.dtypes:
                    url = servers[dtype][1]
                    run = stream_request(
                        client, url, args.served_model_name, image, args.question, args.max_tokens
                    )
                    api[dtype].append(run)
                    plain[dtype].append(arms[dtype]())
                    print(
                        f"[{dtype}] rep {rep}: API {api[dtype][-1]['decode']:.1f} tok/s, "
                        f"generate {plain[dtype][-1]['decode']:.1f}",
                        file=sys.stderr,
                        flush=True,
                    )
            for dtype in args.dtypes:
                same[dtype] = equal_under_load(client, args, servers[dtype][1]) if args.equality else None
    finally:
        for process, _ in servers.values():
            stop_server(process)
    rows = []
    for dtype in args.dtypes:
        rows.append({"dtype": dtype, "arm": "API, streamed", **median(api[dtype][1:]), "same": same[dtype]})
        rows.append({"dtype": dtype, "arm": "model.generate", **median(plain[dtype][1:]), "same": None})
    return rows


def prompts(n: int) -> list[tuple[int, int]]:
    """(image index, question index) of n prompts, all different for n <= 24."""
    return [(k % len(images()), k % len(QUESTIONS)) for k in range(n)]


def equal_under_load(client: httpx.Client, args, url: str) -> tuple[int, int]:
    """`--equality` greedy prompts asked one at a time, then all at once: (answers the same, prompts)."""
    urls = [data_url(*im) for im in images()]

    def ask(prompt: tuple[int, int], http: httpx.Client) -> str:
        image, question = prompt
        run = stream_request(
            http, url, args.served_model_name, urls[image], QUESTIONS[question], args.max_tokens
        )
        return run["text"]

    def ask_own_connection(prompt: tuple[int, int]) -> str:
        with httpx.Client() as http:
            return ask(prompt, http)

    alone = [ask(p, client) for p in prompts(args.equality)]
    with ThreadPoolExecutor(args.equality) as pool:
        together = list(pool.map(ask_own_connection, prompts(args.equality)))
    print(
        f"greedy answers under load equal to alone: {sum(map(str.__eq__, alone, together))}/{len(alone)}",
        file=sys.stderr,
        flush=True,
    )
    return sum(a == b for a, b in zip(alone, together, strict=True)), len(alone)


def sweep(args, url: str, clients: int, single_request: float) -> dict:
    """N clients, each sending `--requests` streamed requests back to back (first sends spread over one request);
    measured in the steady state (see the module docstring)."""
    urls = [data_url(*im) for im in images()]
    runs: dict[int, list[dict]] = {}

    def client_loop(k: int) -> None:
        time.sleep(k / clients * single_request)
        runs[k] = []
        with httpx.Client() as client:
            for r in range(args.requests):
                image, question = prompts(k * args.requests + r + 1)[-1]
                run = stream_request(
                    client, url, args.served_model_name, urls[image], QUESTIONS[question], args.max_tokens
                )
                runs[k].append({**run, "prompt_id": (image, question)})

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    everything = [run for k in sorted(runs) for run in runs[k]]
    first = max(r[0]["end"] for r in runs.values())  # every client has had its first answer
    last = min(r[-1]["end"] for r in runs.values())  # the first client to finish has had its last
    stamps = [t for run in everything for t in run["stamps"] if first <= t <= last]
    steady = [run for r in runs.values() for run in r[1:]]
    ttfts = [run["ttft"] for run in steady]
    return {
        "answers": {run["prompt_id"]: run["text"] for run in everything},
        "clients": clients,
        "requests": len(everything),
        "window": last - first,
        "tokens": len(stamps),
        "aggregate": len(stamps) / (last - first),
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p95": percentile(ttfts, 0.95),
        "decode": statistics.median(run["decode"] for run in steady if run["decode"] == run["decode"]),
    }


def combine(runs: list[dict]) -> dict:
    """One row from the rounds of a client count: medians of the rates and times, sums of the counts."""
    out = {
        key: statistics.median(run[key] for run in runs)
        for key in ("aggregate", "ttft_p50", "ttft_p95", "decode")
    }
    out.update({key: sum(run[key] for run in runs) for key in ("requests", "window", "tokens")})
    out["answers"] = {k: v for run in runs for k, v in run["answers"].items()}
    return {**out, "clients": runs[0]["clients"], "rounds": len(runs)}


def pick_dtype(streamed: dict[str, dict]) -> tuple[str, str]:
    """The dtype to serve: the fastest streamed decode among those whose greedy answers under load were all the
    same as alone (the batching invariant), else the fastest; and the reason."""
    exact = [r for r in streamed.values() if r["same"] is not None and r["same"][0] == r["same"][1]]
    if exact:
        best = max(exact, key=lambda r: r["decode"])
        return best[
            "dtype"
        ], "the fastest streamed decode whose answers under load were all the same as alone"
    best = max(streamed.values(), key=lambda r: r["decode"])
    return best["dtype"], "the fastest streamed decode"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_latency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model",
        default="base",
        help="what `python -m serve --model` gets ('base': the trained starter answers in ~2 tokens, too few to time)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument(
        "--serve-dtype", choices=["float32", "bfloat16"], help="the sweep's dtype (default: picked)"
    )
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--url", help="sweep a running server instead (no overhead table)")
    parser.add_argument("--served-model-name", default="medllava")
    parser.add_argument(
        "--reps", type=int, default=3, help="streamed requests per arm in table 1 (plus a warm-up)"
    )
    parser.add_argument("--equality", type=int, default=8, help="prompts asked alone, then at once (0: skip)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client in the sweep (>= 3)")
    parser.add_argument("--rounds", type=int, default=2, help="times the sweep runs every client count")
    parser.add_argument("--question", default=QUESTIONS[1], help="table 1's question (about retina.jpg)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if (
        args.reps < 1
        or args.requests < 3
        or args.rounds < 1
        or min(args.clients) < 1
        or args.max_tokens < 2
        or args.equality < 0
    ):
        parser.error(
            "--reps, --rounds and --clients must be >= 1, --requests >= 3, --max-tokens >= 2, --equality >= 0"
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally blocks) when killed
    command = "python -m bench.serve_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    before = machine_state()
    print(f"{command.strip()}: {args.model}; {before}", file=sys.stderr, flush=True)

    rows = overhead(args, resolve_model(args.model)) if not args.url else []
    streamed = {row["dtype"]: row for row in rows if row["arm"].startswith("API")}
    dtype, reason = (args.serve_dtype, "--serve-dtype") if args.serve_dtype else (None, "")
    if dtype is None and streamed:
        dtype, reason = pick_dtype(streamed)
    dtype = dtype or args.dtypes[0]

    process, url = None, args.url.rstrip("/") if args.url else None
    if url is None:
        print(f"[{dtype}] starting the server for the sweep ...", file=sys.stderr, flush=True)
        process, url = start_server(args.model, dtype, max(args.clients))
    try:
        with httpx.Client() as client:  # warm-up, and the duration of one request (spreads the first sends)
            one = stream_request(
                client, url, args.served_model_name, data_url(*images()[0]), args.question, args.max_tokens
            )
        rounds: dict[int, list[dict]] = {n: [] for n in sorted(set(args.clients))}
        for r in range(args.rounds):  # every client count in every round, in alternating order
            for n in sorted(rounds) if r % 2 == 0 else sorted(rounds, reverse=True):
                rounds[n].append(sweep(args, url, n, one["total"]))
                print(
                    f"round {r}, {n} client(s): {rounds[n][-1]['aggregate']:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
        sweeps = [combine(runs) for runs in rounds.values()]
    finally:
        stop_server(process)
    after = machine_state()

    print(
        f"\n`{command.strip()}` ({args.model}, {os.cpu_count()} CPU cores)\n\nbefore: {before}\nafter: {after}\n"
    )
    if rows:
        table = []
        for row in rows:
            plain = next(r for r in rows if r["dtype"] == row["dtype"] and r["arm"] == "model.generate")
            same = "" if row["same"] is None else f"{row['same'][0]}/{row['same'][1]}"
            table.append(
                [
                    row["dtype"],
                    row["arm"],
                    row["prompt"],
                    row["tokens"],
                    f"{row['ttft']:.2f}",
                    f"{row['decode']:.1f}",
                ]
                + [f"{row['decode'] / plain['decode']:.2f}", f"{row['total']:.2f}", same]
            )
        print(
            f"Streaming overhead (medians of {args.reps} requests after a warm-up, max_tokens {args.max_tokens}):\n"
        )
        headers = ["dtype", "arm", "prompt tokens", "completion tokens", "TTFT (s)", "decode (tok/s)"]
        headers += [
            "decode / generate's",
            "total (s)",
            f"greedy answers under load = alone ({args.equality} at once)",
        ]
        print(markdown_table(headers, table))
        print(f"\nServing dtype: {dtype} ({reason})")
    base = next((s for s in sweeps if s["clients"] == 1), sweeps[0])
    table = []
    for s in sweeps:
        shared = [k for k in s["answers"] if k in base["answers"]]
        same = sum(s["answers"][k] == base["answers"][k] for k in shared)
        table.append(
            [s["clients"], s["requests"], f"{s['window']:.1f}", s["tokens"], f"{s['aggregate']:.1f}"]
            + [f"{s['aggregate'] / base['aggregate']:.2f}", f"{s['ttft_p50']:.2f}", f"{s['ttft_p95']:.2f}"]
            + [f"{s['ttft_p95'] / base['ttft_p50']:.2f}", f"{s['decode']:.1f}", f"{same}/{len(shared)}"]
        )
    print(
        f"\nConcurrent streaming clients ({dtype}, {args.requests} requests each, max_tokens {args.max_tokens}; "
        f"medians of {args.rounds} rounds, counts summed):\n"
    )
    one_client = f"{base['clients']}-client"
    headers = [
        "clients",
        "requests",
        "steady window (s)",
        "tokens in it",
        "aggregate tok/s",
        f"x {one_client}",
        "TTFT p50 (s)",
    ]
    headers += ["TTFT p95 (s)", f"TTFT p95 / {one_client} p50", "per-stream decode (tok/s)"]
    headers += [f"answers = {one_client} answers"]
    print(markdown_table(headers, table))


if __name__ == "__main__":
    main()
