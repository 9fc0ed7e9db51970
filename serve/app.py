"""One process, one model: the FastAPI app with the OpenAI-compatible routes and the Gradio chat mounted beside them.

    from serve.app import build_app
    app = build_app(Engine.load(model_dir))      # then: uvicorn.run(app, host="127.0.0.1", port=7860)

`python -m serve` (serve/__main__.py) is the command-line entry point.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from medllava.speech import MAX_AUDIO_BYTES
from serve.api import APIError, api_router, error_response
from serve.chat import build_chat
from serve.engine import NOT_FOR_CLINICAL_USE, Engine
from serve.inputs import MAX_VOLUME_BYTES

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_QUESTIONS = {
    "ct": "What imaging modality is this, and which part of the body does it show?",
    "retina": "What kind of image is this? Describe what you see.",
    "microaneurysms": "Which structures are visible in this image?",
}


def _packaged_examples() -> list[tuple[str, Path]]:
    """Real images that installed packages ship: a pydicom CT slice and scikit-image's fundus photographs."""
    found = []
    with contextlib.suppress(Exception):
        from pydicom.data import get_testdata_file

        found.append(("ct", Path(get_testdata_file("CT_small.dcm"))))
    with contextlib.suppress(Exception):
        import skimage

        data = Path(skimage.__file__).parent / "data"
        found += [("retina", data / "retina.jpg"), ("microaneurysms", data / "microaneurysms.png")]
    return [(key, path) for key, path in found if path.is_file()]


# A few medsynth test cases (seed 0) shipped with the code, for a fresh set-up that has not run `make data`.
SHIPPED_EXAMPLES = Path(__file__).parent / "examples" / "vqa_test_examples.jsonl"


def find_examples(jsonl: Path = REPO / "data" / "medsynth" / "vqa_test.jsonl", n: int = 4) -> list[dict]:
    """Example cases for the chat: the first single-image questions of the synthetic VQA test split if it has been
    built (else the shipped copy of a few of its cases), else a few real packaged images. Files are copied to a
    temporary directory Gradio may serve."""
    cases: list[tuple[str, Path]] = []
    if not jsonl.is_file():
        jsonl = SHIPPED_EXAMPLES
    if jsonl.is_file():
        from medllava.schema import read_jsonl, resolve_image, vqa_question

        for _, row in read_jsonl(jsonl):
            images = row.get("images") or []
            if len(images) == 1 and (path := resolve_image(images[0], jsonl.parent)).is_file():
                cases.append((vqa_question(row), path))
            if len(cases) == n:
                break
    if not cases:
        cases = [(EXAMPLE_QUESTIONS[key], path) for key, path in _packaged_examples()]
    out_dir = Path(tempfile.mkdtemp(prefix="medllava-examples-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    examples = []
    for i, (question, path) in enumerate(cases):
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        copy = (
            out_dir / f"example-{i + 1}{suffix}"
        )  # a neutral name: never show a file name that may identify
        shutil.copyfile(path, copy)
        examples.append({"text": question, "files": [str(copy)]})
    return examples


def build_app(engine: Engine, examples: list[dict] | None = None, url: str | None = None) -> FastAPI:
    """The API routes and the chat for one engine. `url`, if given, is printed once the server has started."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.to_thread

        # Requests waiting for a generation slot each hold a worker thread; keep enough for the queue, the
        # running generations and everything else (anyio's default is 40).
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(
            limiter.total_tokens, 2 * (engine.limits.concurrency + engine.limits.max_queue) + 16
        )
        if url:
            print(
                f"MedLLaVA is serving {engine.model_id} ({engine.source}). NOT FOR CLINICAL USE.\n"
                f"  chat: {url}/\n  API:  {url}/v1  (OpenAI-compatible: POST {url}/v1/chat/completions)",
                file=sys.stderr,
                flush=True,
            )
        yield

    app = FastAPI(
        title="MedLLaVA",
        description=NOT_FOR_CLINICAL_USE,
        lifespan=lifespan,
        docs_url="/v1/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, f"invalid request: {exc.errors()}"))

    app.include_router(api_router(engine))
    chat = build_chat(engine, examples)
    gr.mount_gradio_app(
        app,
        chat,
        path="/",
        footer_links=["api", "gradio", "settings"],
        run_history=False,
        ssr_mode=False,
        # the largest upload: an image, a volume (checked again as a whole) or a recorded question
        max_file_size=max(engine.limits.max_image_bytes, MAX_VOLUME_BYTES, MAX_AUDIO_BYTES),
        show_error=True,
    )
    return app
