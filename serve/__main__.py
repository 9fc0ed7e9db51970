"""Serve a MedLLaVA (or any HF Llava) checkpoint: the Gradio chat at / and the OpenAI-compatible API at /v1.

Usage:
    python -m serve --model default --host 127.0.0.1 --port 7860          # the default model (`make demo`)
    python -m serve --model ~/.cache/medllava/base-112px --port 8000      # a checkpoint directory (or hub id)
    python -m serve --model default --dtype bfloat16 --concurrency 2 --max-queue 32 --max-queue-wait 120

One process loads the model once; chat and API share its generation slots. Not for clinical use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Set before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine shared with other
# jobs spinning threads fight them for the cores: a decoding step took 196 ms spinning, 57 ms not (docs/serve.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from medllava.assets import resolve_model  # noqa: E402
from serve.engine import Limits  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="default",
        help="checkpoint directory, hub id, or 'default' (the trained starter if shipped, else the base)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype on CPU"
    )
    parser.add_argument("--served-model-name", default="medllava", help="the model name API clients send")
    parser.add_argument(
        "--concurrency", type=int, default=defaults.concurrency, help="generations running at once"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="requests allowed to wait for a generation slot; beyond it the API answers 429",
    )
    parser.add_argument(
        "--max-queue-wait",
        type=float,
        default=defaults.max_queue_wait,
        help="seconds a request may wait for a generation slot; beyond it the API answers 503",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="the largest max_tokens a request may ask for",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=defaults.max_prompt_tokens,
        help="prompt length limit in tokens, image tokens included",
    )
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="images per conversation")
    parser.add_argument(
        "--max-image-mb",
        type=float,
        default=defaults.max_image_bytes / 2**20,
        help="size limit of one image file",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=defaults.max_body_bytes / 2**20,
        help="size limit of one API request body (images travel base64-encoded in it: 4/3 of their size)",
    )
    parser.add_argument(
        "--image-prefix-cache",
        type=int,
        default=None,
        metavar="N",
        help="image prompt prefixes whose KV cache is kept for follow-up questions about the same image "
        "(LRU, about 5 MB each for the default model); 0 turns it off; default: 32 in float32, 0 in bfloat16",
    )
    parser.add_argument("--no-examples", action="store_true", help="do not show example cases in the chat")
    args = parser.parse_args(argv)
    for name in ("concurrency", "max_new_tokens", "max_prompt_tokens", "max_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.image_prefix_cache is not None and args.image_prefix_cache < 0:
        parser.error("--image-prefix-cache must be >= 0 (0 turns it off)")
    if args.max_queue < 0 or args.max_image_mb <= 0 or args.max_body_mb <= 0 or args.max_queue_wait <= 0:
        parser.error("--max-queue must be >= 0; --max-image-mb, --max-body-mb and --max-queue-wait > 0")
    return args


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        max_queue_wait=args.max_queue_wait,
        max_new_tokens=args.max_new_tokens,
        default_new_tokens=min(Limits.default_new_tokens, args.max_new_tokens),
        max_prompt_tokens=args.max_prompt_tokens,
        max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_body_bytes=int(args.max_body_mb * 2**20),
    )


class RedactFileNames(logging.Filter):
    """Keep uploaded files' names out of the access log: Gradio serves uploads at /gradio_api/file=<path>, and an
    uploaded file's name can identify a patient."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            for marker in ("file=", "file%3D", "file%3d"):
                if marker in path:
                    record.args = (*args[:2], path.split(marker)[0] + marker + "<redacted>", *args[3:])
                    break
        return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn

    from serve.app import build_app, find_examples
    from serve.engine import Engine

    limits = limits_from_args(args)
    try:
        model_dir = resolve_model(args.model)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --model: {e}") from None
    print(f"loading {model_dir} ({args.dtype}) ...", file=sys.stderr, flush=True)
    try:
        engine = Engine.load(
            model_dir,
            model_id=args.served_model_name,
            dtype=args.dtype,
            limits=limits,
            aliases=(args.model,),
            image_prefix_cache=args.image_prefix_cache,
        )
    except (OSError, ValueError) as e:  # no such directory or hub id (offline), not a Llava checkpoint, ...
        raise SystemExit(
            f"error: cannot load --model {args.model} ({model_dir}): {type(e).__name__}: {e}"
        ) from None
    examples = None if args.no_examples else find_examples()
    host = f"[{args.host}]" if ":" in args.host else args.host
    app = build_app(engine, examples, url=f"http://{host}:{args.port}")
    # keep-alive longer than uvicorn's 5 s default: clients reuse pooled connections between slow generations
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_keep_alive=30)
    logging.getLogger("uvicorn.access").addFilter(RedactFileNames())  # after Config has set up logging
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
