"""The Gradio chat: upload a medical image (PNG, JPEG, DICOM, NIfTI), ask, follow up, add images, stream answers.

Built by `serve.app` beside the API and served with `python -m serve --model default` (`make demo`). Every answer
comes from `Engine.respond`, the generator the API uses too. All conversation state lives in one `Session` per
browser session (a `gr.State`); nothing is shared between sessions. Uploaded files are shown only as windowed PNG
previews under neutral names, and the only DICOM header values ever displayed are the non-identifying technical
tags of `medllava.processing.SAFE_DICOM_TAGS`; nothing about an upload is logged.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from medllava.generation import SamplingParams
from medllava.processing import ImageLoadError, ImageTooLargeError, dicom_summary, is_dicom, load_image
from serve.engine import NOT_FOR_CLINICAL_USE, Busy, Engine

FILE_TYPES = [
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".dcm",
    ".dicom",
    ".nii",
    ".gz",
]
DEFAULT_QUESTION = "Describe this image."
NOTICE_MD = f"⚠️ **Not for clinical use.** {NOT_FOR_CLINICAL_USE}"


@dataclass
class Turn:
    text: str
    images: list[int]  # indices into Session.images attached with this question
    answer: str | None = None  # None until generated


class Session:
    """One browser session's conversation: images (kept in context for every later turn) and turns.

    A plain class, not a dataclass: Gradio serialises dataclass state values into the page config.
    """

    def __init__(self, images=None, previews=None, info=None, turns=None):
        self.images: list[Image.Image] = images or []
        self.previews: list[str] = previews or []  # a PNG per image, under a neutral name
        self.info: list[str] = info or []  # a caption per image (never a file name or identifier)
        self.turns: list[Turn] = turns or []
        self.stop = threading.Event()  # set by the Stop button; ends the running generation

    def close(self) -> None:
        """Delete this session's preview files (called by Gradio when the session's state expires)."""
        for path in self.previews:
            Path(path).unlink(missing_ok=True)

    def __deepcopy__(self, memo):
        """gr.State deep-copies the initial value for each new session; a threading.Event cannot be copied."""
        return Session(
            list(self.images), list(self.previews), list(self.info), copy.deepcopy(self.turns, memo)
        )

    def messages(self) -> list[dict]:
        """The conversation in the schema, up to and including the last question (its answer left out)."""
        out = []
        for i, turn in enumerate(self.turns):
            out.append(
                {
                    "role": "user",
                    "content": [{"type": "image"}] * len(turn.images) + [{"type": "text", "text": turn.text}],
                }
            )
            if i < len(self.turns) - 1:
                out.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer or ""}]})
        return out

    def display(self) -> list[dict]:
        """The conversation as gr.Chatbot messages (previews, never the uploaded files themselves)."""
        out = []
        for turn in self.turns:
            out.extend(
                {"role": "user", "content": {"path": self.previews[k], "alt_text": f"image {k + 1}"}}
                for k in turn.images
            )
            out.append({"role": "user", "content": turn.text})
            if turn.answer is not None:
                out.append({"role": "assistant", "content": turn.answer or "…"})
        return out

    def preview(self):
        return (self.previews[-1], self.info[-1]) if self.images else (None, "No image yet.")


def _caption(path: str, image: Image.Image, number: int) -> str:
    caption = f"Image {number}: {image.width}×{image.height}"
    data = Path(path).read_bytes()[:132]
    if is_dicom(data, path):
        import pydicom

        tags = dicom_summary(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        shown = ", ".join(f"{k} {v}" for k, v in tags.items() if k in ("Modality", "BodyPartExamined"))
        caption += f" · DICOM{' · ' + shown if shown else ''} · windowed for display"
    return caption


def add_images(session: Session, paths: list[str], engine: Engine, preview_dir: Path) -> list[int]:
    """Load uploads into the session (all or none); errors name the upload by number, never by file name."""
    if len(session.images) + len(paths) > engine.limits.max_images:
        raise gr.Error(
            f"A conversation can hold at most {engine.limits.max_images} images; press Clear to start "
            "a new one."
        )
    loaded = []
    for k, path in enumerate(paths, start=len(session.images) + 1):
        size = Path(path).stat().st_size
        if size > engine.limits.max_image_bytes:
            raise gr.Error(
                f"Upload {k} is {size / 2**20:.1f} MiB; the limit is "
                f"{engine.limits.max_image_bytes / 2**20:.0f} MiB."
            )
        try:
            # every image limit (pixels per frame, declared size of a DICOM/NIfTI) is checked there, from the header
            image = load_image(
                path,
                max_pixels=engine.limits.max_image_pixels,
                max_decoded_bytes=engine.limits.max_decoded_bytes,
            )
        except ImageTooLargeError as e:
            raise gr.Error(f"Upload {k} is too large: {str(e).replace(path, 'the file')}") from None
        except ImageLoadError as e:
            raise gr.Error(f"Upload {k} cannot be read: {str(e).replace(path, 'the file')}") from None
        loaded.append((path, image, k))
    indices = []
    preview_dir.mkdir(parents=True, exist_ok=True)  # in case a temp-directory cleaner removed it
    for path, image, k in loaded:
        preview = preview_dir / f"{uuid.uuid4().hex}.png"
        image.save(preview)
        session.images.append(image)
        session.previews.append(str(preview))
        session.info.append(_caption(path, image, k))
        indices.append(len(session.images) - 1)
    return indices


def _params(session: Session, temperature, top_p, max_new_tokens, seed) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed is None or seed == "" else int(seed),
        stop_event=session.stop,
    )


def generate_answer(session: Session, engine: Engine, params: SamplingParams):
    """Stream the answer to the session's last question into it; yields after each piece."""
    turn = session.turns[-1]
    messages = session.messages()
    session.stop.clear()
    turn.answer = ""
    try:
        for piece in engine.respond(session.images, messages, params):
            turn.answer += piece
            yield
    except Busy as e:
        raise gr.Error(str(e)) from None


def build_chat(engine: Engine, examples: list[dict] | None = None) -> gr.Blocks:
    """The chat UI for one engine; `examples` are {"text", "files"} values for the input box."""
    preview_dir = Path(tempfile.mkdtemp(prefix="medllava-previews-"))
    atexit.register(shutil.rmtree, preview_dir, ignore_errors=True)
    limits = engine.limits

    def outputs(session: Session, textbox=None):
        image, info = session.preview()
        return (gr.update() if textbox is None else textbox), session.display(), image, info

    def chat(value: dict, session: Session, temperature, top_p, max_new_tokens, seed):
        value = value or {}
        text, files = (value.get("text") or "").strip(), value.get("files") or []
        if not text and not files:
            raise gr.Error("Type a question (and attach an image if you like).")
        if session.turns and session.turns[-1].answer is None:
            raise gr.Error("Still answering the previous question; press Stop first.")
        n_images = len(session.images)
        indices = add_images(
            session, [f if isinstance(f, str) else f["path"] for f in files], engine, preview_dir
        )
        session.turns.append(Turn(text or DEFAULT_QUESTION, indices))
        try:
            engine.check(
                session.images, session.messages(), _params(session, temperature, top_p, max_new_tokens, seed)
            )
        except ValueError as e:  # roll the turn back: the conversation stays as it was
            session.turns.pop()
            del session.images[n_images:], session.previews[n_images:], session.info[n_images:]
            raise gr.Error(f"{e}. Press Clear to start a new conversation.") from None
        yield outputs(session, {"text": "", "files": []})
        for _ in generate_answer(session, engine, _params(session, temperature, top_p, max_new_tokens, seed)):
            yield outputs(session)
        yield outputs(session)

    def retry(session: Session, temperature, top_p, max_new_tokens, seed):
        if not session.turns:
            raise gr.Error("Nothing to retry yet.")
        session.turns[-1].answer = None
        for _ in generate_answer(session, engine, _params(session, temperature, top_p, max_new_tokens, seed)):
            yield outputs(session)
        yield outputs(session)

    def undo(session: Session):
        """Remove the last question and its answer; its text goes back into the input box."""
        if not session.turns:
            return outputs(session)
        turn = session.turns.pop()
        if turn.images:
            first = turn.images[0]
            del session.images[first:], session.previews[first:], session.info[first:]
        return outputs(session, {"text": turn.text, "files": []})

    def clear():
        session = Session()
        return (session, *outputs(session, {"text": "", "files": []}))

    def stop(session: Session):
        session.stop.set()

    with gr.Blocks(title="MedLLaVA chat (not for clinical use)", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# MedLLaVA: chat about a medical image")
        gr.Markdown(NOTICE_MD, elem_id="notice")
        # Per-session state; deleted (and its preview files with it) an hour after the browser tab closes.
        session = gr.State(Session(), delete_callback=Session.close)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    elem_id="chatbot",
                    height=560,
                    feedback_options=None,
                    placeholder="Attach an image (PNG, JPEG, DICOM or NIfTI) and ask about it.",
                )
                box = gr.MultimodalTextbox(
                    file_types=FILE_TYPES,
                    file_count="multiple",
                    elem_id="question",
                    show_label=False,
                    placeholder="Ask about the image (attach a new one any time with the clip button)",
                    submit_btn="Send",
                )
                with gr.Row():
                    stop_btn = gr.Button("Stop", elem_id="stop", variant="stop")
                    retry_btn = gr.Button("Retry", elem_id="retry")
                    undo_btn = gr.Button("Undo", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                preview = gr.Image(
                    label="Current image (windowed preview)",
                    type="filepath",
                    interactive=False,
                    elem_id="preview",
                    height=280,
                )
                info = gr.Markdown("No image yet.", elem_id="image-info")
                with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                    temperature = gr.Slider(
                        0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                    max_new_tokens = gr.Slider(
                        1,
                        limits.max_new_tokens,
                        value=min(256, limits.max_new_tokens),
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(
                        None,
                        precision=0,
                        minimum=0,
                        label="Seed (blank = random; for sampling)",
                        elem_id="seed",
                    )
        if examples:
            gr.Examples([[e] for e in examples], inputs=[box], label="Example cases")
        gr.Markdown(
            f"<small>Model: `{engine.model_id}` · OpenAI-compatible API at `/v1/chat/completions` · "
            f"{NOT_FOR_CLINICAL_USE}</small>"
        )

        sampling = [temperature, top_p, max_new_tokens, seed]
        shown = [box, chatbot, preview, info]
        # One generation at a time per listener (the engine's slots are shared with the API).
        common = dict(concurrency_limit=limits.concurrency, concurrency_id="generate")
        box.submit(chat, [box, session, *sampling], shown, api_name="chat", **common)
        retry_event = dict(fn=retry, inputs=[session, *sampling], outputs=shown, **common)
        retry_btn.click(api_name="retry", **retry_event)
        chatbot.retry(api_visibility="private", **retry_event)
        undo_btn.click(undo, [session], shown, api_name="undo")
        chatbot.undo(undo, [session], shown, api_visibility="private")
        clear_btn.click(clear, None, [session, *shown], api_name="clear")
        chatbot.clear(clear, None, [session, *shown], api_visibility="private")
        stop_btn.click(stop, [session], None, api_name="stop", queue=False)
    blocks.queue(max_size=limits.max_queue + limits.concurrency)
    return blocks
