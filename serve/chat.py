"""The Gradio chat: upload medical images or CT/MRI volumes, compare a prior and a current study, ask (typed or
spoken), follow up, stream answers.

Built by `serve.app` beside the API and served with `python -m serve --model default` (`make demo`). Every answer
comes from `Engine.respond`, the generator the API uses too. All conversation state lives in one `Session` per
browser session (a `gr.State`); nothing is shared between sessions.

What can be attached to a question:
- in the question box: images (PNG, JPEG, TIFF, DICOM, ...), and volumes: a NIfTI file (`.nii`, `.nii.gz`) or a
  zip of one DICOM series;
- in the *Prior and current study* slots: one image or one volume each (there, several DICOM files are the
  slices of one series), with an optional study date. The question's text then starts with the line of
  `medllava.image_roles` ("Image 1: prior study (2025-03-01). Image 2: current study."), as the API writes it.
A volume becomes the slices the model sees (`serve.inputs`: plane, number of slices and CT windows are chosen
under *Volume settings*; its slice positions go into the text) and a preview with a slice scroller and a choice of
CT window. A microphone (or an uploaded recording) is transcribed with `medllava.speech` into the question box,
to be edited before sending.

Uploads are shown only as PNG previews under neutral names, errors name an upload by number, never by file name,
and the only DICOM header values ever displayed are the technical tags Modality and BodyPartExamined; nothing
about an upload is logged.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from medllava.generation import SamplingParams
from medllava.image_roles import ImageInput, check_date, with_image_roles
from medllava.processing import ImageLoadError, ImageTooLargeError, dicom_summary, is_dicom, load_image
from medllava.schema import message
from medllava.speech import AudioError, transcribe
from medllava.volumes import AXES, Volume, VolumeError, VolumeSlices, VolumeTooLargeError, is_volume_file
from serve.engine import NOT_FOR_CLINICAL_USE, Busy, Engine
from serve.inputs import (
    DEFAULT_VOLUME_SLICES,
    MAX_VOLUME_BYTES,
    TooManyImages,
    open_volume,
    show_slices,
    volume_error_text,
    volume_limits,
)

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
    ".zip",
]
DEFAULT_QUESTION = "Describe this image."
NOTICE_MD = f"⚠️ **Not for clinical use.** {NOT_FOR_CLINICAL_USE}"
# CT windows the model sees (None: the default lung, soft tissue and bone as red, green and blue).
MODEL_WINDOWS = {
    "lung + soft tissue + bone (RGB)": None,
    "lung": ("lung",),
    "soft tissue": ("soft_tissue",),
    "bone": ("bone",),
    "brain": ("brain",),
}
DEFAULT_WINDOWS = next(iter(MODEL_WINDOWS))
AS_SENT = "as the model sees it"
PREVIEW_WINDOWS = [AS_SENT, "lung", "soft tissue", "bone", "brain"]
_SHOWN_TAGS = ("Modality", "BodyPartExamined")
_THUMB = 160  # pixels on a side of one slice in a volume's montage
_MAX_SLICE_INDEX = 4095  # no volume has more slices along an axis (VolumeLimits.max_slice_pixels = 4096^2)


@dataclass
class Upload:
    """One attachment as the model sees it: an image, or the rendered slices of a volume."""

    images: list[Image.Image]
    preview: str  # a PNG under a neutral name: the image, or a montage of the slices
    caption: str  # what it is (never a file name or an identifier)
    description: ImageInput  # role, date and, for a volume, its slices: the text the model reads about it
    first: int = 1  # the number of its first image in the conversation
    volume: Volume | None = None
    shown: VolumeSlices | None = None  # the slices the model sees (their images are `images`)
    windows: tuple | None = None  # the CT windows the model sees (None: the default three)
    files: list[Path] = field(default_factory=list)  # this session's copies of the uploaded files

    @property
    def numbers(self) -> str:
        last = self.first + len(self.images) - 1
        return f"Image {self.first}" if last == self.first else f"Images {self.first}-{last}"

    @property
    def label(self) -> str:
        return f"{self.numbers}: {self.description.label()}"


@dataclass
class Turn:
    text: str
    uploads: list[int]  # indices into Session.uploads attached with this question
    answer: str | None = None  # None until generated


class Session:
    """One browser session's conversation: uploads (kept in context for every later turn) and turns.

    A plain class, not a dataclass: Gradio serialises dataclass state values into the page config.
    """

    def __init__(self, uploads=None, turns=None, selected=None):
        self.uploads: list[Upload] = uploads or []
        self.turns: list[Turn] = turns or []
        self.selected: int | None = selected  # the upload shown in the preview (None: the last one)
        self.scroll_file: str | None = None  # the preview of the slice under the scroller
        self.stop = threading.Event()  # set by the Stop button; ends the running generation

    @property
    def images(self) -> list[Image.Image]:
        return [image for upload in self.uploads for image in upload.images]

    def close(self) -> None:
        """Delete this session's files (called by Gradio when the session's state expires)."""
        for upload in self.uploads:
            _delete(upload)
        if self.scroll_file:
            Path(self.scroll_file).unlink(missing_ok=True)

    def drop_uploads(self, first: int) -> None:
        """Remove the uploads from index `first` on, and their files."""
        for upload in self.uploads[first:]:
            _delete(upload)
        del self.uploads[first:]
        if self.selected is not None and self.selected >= len(self.uploads):
            self.selected = None

    def __deepcopy__(self, memo):
        """gr.State deep-copies the initial value for each new session; a threading.Event cannot be copied."""
        return Session(list(self.uploads), copy.deepcopy(self.turns, memo), self.selected)

    def text(self, turn: Turn) -> str:
        """A question as the model reads it: the line saying what its images are (if any has a role, a date or
        is a volume), then the question."""
        uploads = [self.uploads[k] for k in turn.uploads]
        first = uploads[0].first if uploads else 1
        return with_image_roles(turn.text, [u.description for u in uploads], first)

    def messages(self) -> list[dict]:
        """The conversation in the schema, up to and including the last question (its answer left out)."""
        out = []
        for i, turn in enumerate(self.turns):
            n_images = sum(len(self.uploads[k].images) for k in turn.uploads)
            out.append(message("user", self.text(turn), n_images))
            if i < len(self.turns) - 1:
                out.append(message("assistant", turn.answer or ""))
        return out

    def display(self) -> list[dict]:
        """The conversation as gr.Chatbot messages (previews, never the uploaded files themselves)."""
        out = []
        for turn in self.turns:
            out.extend(
                {
                    "role": "user",
                    "content": {"path": self.uploads[k].preview, "alt_text": self.uploads[k].label},
                }
                for k in turn.uploads
            )
            out.append({"role": "user", "content": self.text(turn)})
            if turn.answer is not None:
                out.append({"role": "assistant", "content": turn.answer or "…"})
        return out

    def shown(self) -> int | None:
        """Index of the upload in the preview."""
        if not self.uploads:
            return None
        return self.selected if self.selected is not None else len(self.uploads) - 1

    def context(self) -> str:
        """Which images the answers are about: every upload in the conversation, in order."""
        if not self.uploads:
            return ""
        return "**Images the answers are about:** " + " · ".join(u.label for u in self.uploads)

    def preview(self):
        k = self.shown()
        if k is None:
            return None, "No image yet."
        upload = self.uploads[k]
        return upload.preview, f"{upload.caption}\n\n{self.context()}"


def _delete(upload: Upload) -> None:
    Path(upload.preview).unlink(missing_ok=True)
    for path in upload.files:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _caption(path: str, image: Image.Image, label: str) -> str:
    caption = f"{label} · {image.width}×{image.height}"
    data = Path(path).read_bytes()[:132]
    if is_dicom(data, path):
        import pydicom

        tags = dicom_summary(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        shown = ", ".join(f"{k} {v}" for k, v in tags.items() if k in _SHOWN_TAGS)
        caption += f" · DICOM{' · ' + shown if shown else ''} · windowed for display"
    return caption


def _mm(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _volume_caption(upload: Upload) -> str:
    volume, shown = upload.volume, upload.shown
    tags = volume.info.get("dicom", {})
    source = "DICOM series" if volume.source == "dicom" else "NIfTI"
    shown_tags = ", ".join(f"{k} {tags[k]}" for k in _SHOWN_TAGS if k in tags)
    slices = ", ".join(str(i) for i in shown.indices)
    positions = ", ".join(_mm(p) for p in shown.positions_mm)
    return (
        f"{upload.label} · {source}{' · ' + shown_tags if shown_tags else ''} · {shown.n_total} {shown.axis} slices "
        f"{_mm(shown.spacing_mm)} mm apart ({shown.direction}); the model sees slices {slices} (at {positions} mm "
        f"from the first), {' / '.join(shown.channels)}"
    )


def _montage(images: list[Image.Image]) -> Image.Image:
    """The slices side by side in rows of up to 4, each fitted into a _THUMB-pixel square."""
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * _THUMB, rows * _THUMB))
    for k, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((_THUMB, _THUMB))
        x = (k % columns) * _THUMB + (_THUMB - thumb.width) // 2
        y = (k // columns) * _THUMB + (_THUMB - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet


def _scrub(text: str, names: dict[str, str]) -> str:
    """`text` with every file name or path in `names` replaced by its neutral name (longest first)."""
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, names[name])
    return text


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else f["path"] for f in files or []]


@dataclass
class Attachment:
    """Files that become one upload: an image, or one volume (a NIfTI file, a zip, or DICOM files of a series)."""

    paths: list[str]
    role: str | None = None
    date: str | None = None


@dataclass
class VolumeSettings:
    axis: str = "axial"
    n_slices: int = DEFAULT_VOLUME_SLICES
    windows: str = DEFAULT_WINDOWS


def _is_volume(paths: list[str]) -> bool:
    if len(paths) > 1:
        return True  # several files in one slot: the slices of one series
    with open(paths[0], "rb") as f:
        head = f.read(1024)
    return is_volume_file(head, paths[0])


def _load_volume(
    attachment: Attachment,
    number: int,
    upload_dir: Path,
    engine: Engine,
    images_before: int,
    n_slices: int,
    settings: VolumeSettings,
) -> Upload:
    """Copy the files under neutral names (they stay readable for the scroller), validate, render the slices."""
    limits = engine.limits
    name = f"upload {number}"
    folder = upload_dir / uuid.uuid4().hex
    folder.mkdir(parents=True)
    names = {}
    total = 0
    copies = []
    for k, path in enumerate(attachment.paths, start=1):
        total += Path(path).stat().st_size
        if total > MAX_VOLUME_BYTES:
            shutil.rmtree(folder, ignore_errors=True)
            raise gr.Error(
                f"Upload {number} is over the {MAX_VOLUME_BYTES / 2**20:.0f} MiB limit on a volume's files."
            )
        lower = path.lower()
        suffix = ".nii.gz" if lower.endswith(".nii.gz") else Path(lower).suffix
        copy_path = folder / f"file-{k:04d}{suffix}"
        shutil.copyfile(path, copy_path)
        copies.append(copy_path)
        names[path] = name
        names[Path(path).name] = name
        if zipfile.is_zipfile(copy_path):
            with zipfile.ZipFile(copy_path) as zf:
                names.update(
                    {member: "a file" for member in zf.namelist()[: volume_limits(limits).max_files]}
                )
    names[str(folder)] = name
    source = copies[0] if len(copies) == 1 else copies
    try:
        volume = open_volume(source, name, limits)
        windows = MODEL_WINDOWS.get(settings.windows) if volume.modality == "CT" else None
        shown = show_slices(
            volume, limits, images_before, n_slices=n_slices, axis=settings.axis, windows=windows
        )
    except TooManyImages as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise gr.Error(f"Upload {number}: {e}. Press Clear to start a new conversation.") from None
    except VolumeTooLargeError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise gr.Error(f"Upload {number} is too large: {_scrub(str(e), names)}") from None
    except VolumeError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise gr.Error(
            f"Upload {number} cannot be read as a volume: {_scrub(volume_error_text(e), names)}"
        ) from None
    description = ImageInput.from_volume(shown, attachment.role, attachment.date)
    return Upload(
        shown.images, "", "", description, volume=volume, shown=shown, windows=windows, files=[folder]
    )


def _load_image(attachment: Attachment, number: int, engine: Engine) -> Upload:
    path = attachment.paths[0]
    limits = engine.limits
    size = Path(path).stat().st_size
    if size > limits.max_image_bytes:
        raise gr.Error(
            f"Upload {number} is {size / 2**20:.1f} MiB; the limit is {limits.max_image_bytes / 2**20:.0f} MiB."
        )
    try:
        # every image limit (pixels per frame, declared size of a DICOM/NIfTI) is checked there, from the header
        image = load_image(
            path, max_pixels=limits.max_image_pixels, max_decoded_bytes=limits.max_decoded_bytes
        )
    except ImageTooLargeError as e:
        raise gr.Error(f"Upload {number} is too large: {str(e).replace(path, 'the file')}") from None
    except ImageLoadError as e:
        raise gr.Error(f"Upload {number} cannot be read: {str(e).replace(path, 'the file')}") from None
    return Upload([image], "", "", ImageInput(role=attachment.role, date=attachment.date))


def add_uploads(
    session: Session,
    attachments: list[Attachment],
    engine: Engine,
    preview_dir: Path,
    settings: VolumeSettings | None = None,
) -> list[int]:
    """Load attachments into the session (all or none); errors name an upload by number, never by file name.

    A volume gets `settings.n_slices` slices, or its share of the images the conversation has room for."""
    settings = settings or VolumeSettings()
    limits = engine.limits
    is_volume = [_is_volume(a.paths) for a in attachments]
    n_volumes = sum(is_volume)
    n_plain = len(attachments) - n_volumes
    images_before = len(session.images)
    if images_before + len(attachments) > limits.max_images:
        raise gr.Error(
            f"A conversation can hold at most {limits.max_images} images (a volume's slices count as images); "
            "press Clear to start a new one."
        )
    share = (limits.max_images - images_before - n_plain) // max(1, n_volumes)
    preview_dir.mkdir(parents=True, exist_ok=True)  # in case a temp-directory cleaner removed it
    loaded: list[Upload] = []
    try:
        for k, attachment in enumerate(attachments):
            number = len(session.uploads) + k + 1
            before = images_before + sum(len(u.images) for u in loaded)
            if is_volume[k]:
                n_slices = max(1, min(int(settings.n_slices), share))
                upload = _load_volume(attachment, number, preview_dir, engine, before, n_slices, settings)
            else:
                upload = _load_image(attachment, number, engine)
            upload.first = before + 1
            loaded.append(upload)
            preview = preview_dir / f"{uuid.uuid4().hex}.png"
            if upload.volume is not None:
                _montage(upload.images).save(preview)
                upload.preview, upload.caption = str(preview), _volume_caption(upload)
            else:
                upload.images[0].save(preview)
                upload.preview = str(preview)
                upload.caption = _caption(attachment.paths[0], upload.images[0], upload.label)
    except BaseException:
        for upload in loaded:
            _delete(upload)
        raise
    session.uploads += loaded
    session.selected = None
    return list(range(len(session.uploads) - len(loaded), len(session.uploads)))


def attachments_of(value: dict, prior_files, prior_date, current_files, current_date) -> list[Attachment]:
    """The question's attachments in order: the prior study, the current study, then the question box's files
    (each its own upload: an image, or a NIfTI / zip volume)."""
    out = []
    for role, files, date in (("prior", prior_files, prior_date), ("current", current_files, current_date)):
        paths, date = _paths(files), (date or "").strip() or None
        if date is not None:
            try:
                check_date(date)
            except ValueError as e:
                raise gr.Error(f"The {role} study date: {e}.") from None
        if paths:
            out.append(Attachment(paths, role, date))
        elif date is not None:
            raise gr.Error(f"A {role} study date is set but no {role} study is attached.")
    out += [Attachment([path]) for path in _paths(value.get("files"))]
    return out


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


def render_slice(session: Session, index: int, window: str) -> tuple[str | None, str]:
    """The preview of one slice of the shown volume, in `window` (a CT window name, or as the model sees it)."""
    k = session.shown()
    if k is None or session.uploads[k].volume is None:
        return session.preview()
    upload = session.uploads[k]
    shown = upload.shown
    index = max(0, min(int(index), shown.n_total - 1))
    windows = upload.windows
    if upload.volume.modality == "CT" and window in PREVIEW_WINDOWS[1:]:
        windows = (window.replace(" ", "_"),)
    try:
        one = upload.volume.slices(indices=[index], axis=shown.axis, windows=windows)
    except (VolumeError, OSError) as e:
        message = volume_error_text(e) if isinstance(e, VolumeError) else type(e).__name__
        raise gr.Error(
            f"The slice cannot be shown: {_scrub(message, {str(upload.files[0]): 'the upload'})}"
        ) from None
    path = Path(upload.preview).parent / f"{uuid.uuid4().hex}.png"
    one.images[0].save(path)
    if session.scroll_file:
        Path(session.scroll_file).unlink(missing_ok=True)
    session.scroll_file = str(path)
    seen = " (one of the slices the model sees)" if index in shown.indices else ""
    where = (index * shown.spacing_mm) if not shown.gaps else None
    position = f", about {_mm(where)} mm from slice 0" if where is not None else ""
    info = (
        f"{upload.caption}\n\nShowing slice {index} of {shown.n_total}{position}{seen}, {' / '.join(one.channels)}"
        f"\n\n{session.context()}"
    )
    return str(path), info


def viewer(session: Session):
    """The preview's controls for the shown upload: which upload, a slice scroller and a window for a volume."""
    k = session.shown()
    choices = [(u.label, i) for i, u in enumerate(session.uploads)]
    pick = gr.update(choices=choices, value=k, visible=len(choices) > 1)
    if k is None or session.uploads[k].volume is None:
        return pick, gr.update(visible=False), gr.update(visible=False)
    shown = session.uploads[k].shown
    middle = shown.indices[len(shown.indices) // 2]
    scroller = gr.update(
        minimum=0,
        maximum=max(1, shown.n_total - 1),
        value=middle,
        step=1,
        visible=True,
        label=f"Slice ({shown.axis}, numbered {shown.direction}; the model sees "
        f"{', '.join(map(str, shown.indices))})",
    )
    window = gr.update(value=AS_SENT, visible=session.uploads[k].volume.modality == "CT")
    return pick, scroller, window


def build_chat(engine: Engine, examples: list[dict] | None = None) -> gr.Blocks:
    """The chat UI for one engine; `examples` are {"text", "files"} values for the input box."""
    preview_dir = Path(tempfile.mkdtemp(prefix="medllava-previews-"))
    atexit.register(shutil.rmtree, preview_dir, ignore_errors=True)
    limits = engine.limits
    max_slices = max(1, min(volume_limits(limits).max_sampled, limits.max_images))

    def outputs(session: Session, textbox=None):
        image, info = session.preview()
        return (gr.update() if textbox is None else textbox), session.display(), image, info

    def chat(
        value: dict,
        session: Session,
        temperature,
        top_p,
        max_new_tokens,
        seed,
        prior_files=None,
        prior_date=None,
        current_files=None,
        current_date=None,
        axis="axial",
        n_slices=DEFAULT_VOLUME_SLICES,
        windows=DEFAULT_WINDOWS,
    ):
        value = value or {}
        text = (value.get("text") or "").strip()
        attachments = attachments_of(value, prior_files, prior_date, current_files, current_date)
        if not text and not attachments:
            raise gr.Error("Type a question (and attach an image if you like).")
        if session.turns and session.turns[-1].answer is None:
            raise gr.Error("Still answering the previous question; press Stop first.")
        if axis not in AXES or windows not in MODEL_WINDOWS:
            raise gr.Error(f"Unknown volume plane {axis!r} or CT windows {windows!r}.")
        settings = VolumeSettings(axis, int(n_slices or DEFAULT_VOLUME_SLICES), windows)
        n_uploads = len(session.uploads)
        indices = add_uploads(session, attachments, engine, preview_dir, settings)
        session.turns.append(Turn(text or DEFAULT_QUESTION, indices))
        try:
            engine.check(
                session.images, session.messages(), _params(session, temperature, top_p, max_new_tokens, seed)
            )
        except ValueError as e:  # roll the turn back: the conversation stays as it was
            session.turns.pop()
            session.drop_uploads(n_uploads)
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
        if turn.uploads:
            session.drop_uploads(turn.uploads[0])
        return outputs(session, {"text": turn.text, "files": []})

    def clear(session: Session | None = None):
        if session is not None:
            session.close()
        session = Session()
        return (session, *outputs(session, {"text": "", "files": []}))

    def stop(session: Session):
        session.stop.set()

    def speak(audio: str | None, value: dict | None):
        """Transcribe a recording (or an uploaded audio file) into the question box, after what is typed."""
        value = value or {}
        if not audio:
            return gr.update()
        try:
            result = transcribe(audio, language="en", name="the recording")
        except AudioError as e:
            raise gr.Error(f"The recording cannot be transcribed: {e}") from None
        text = " ".join(filter(None, [(value.get("text") or "").strip(), result["text"].strip()]))
        return {"text": text, "files": _paths(value.get("files"))}

    def select(session: Session, k):
        session.selected = None if k is None else int(k)
        image, info = session.preview()
        return (image, info, *viewer(session)[1:])

    def scroll(session: Session, index, window):
        return render_slice(session, index, window)

    def clear_slots():
        return None, "", None, ""

    with gr.Blocks(title="MedLLaVA chat (not for clinical use)", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# MedLLaVA: chat about a medical image")
        gr.Markdown(NOTICE_MD, elem_id="notice")
        # Per-session state; deleted (and its files with it) an hour after the browser tab closes.
        session = gr.State(Session(), delete_callback=Session.close)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    elem_id="chatbot",
                    height=560,
                    feedback_options=None,
                    placeholder="Attach an image (PNG, JPEG, DICOM), a CT/MRI volume (NIfTI, or a zip of a DICOM "
                    "series) or a prior and a current study, and ask about it.",
                )
                box = gr.MultimodalTextbox(
                    file_types=FILE_TYPES,
                    file_count="multiple",
                    elem_id="question",
                    show_label=False,
                    placeholder="Ask about the image (attach an image or a volume any time with the clip button)",
                    submit_btn="Send",
                )
                voice = gr.Audio(
                    sources=["microphone", "upload"],
                    type="filepath",
                    label="Ask by voice: the transcription goes into the question box, to edit before sending",
                    elem_id="voice",
                )
                with gr.Row():
                    stop_btn = gr.Button("Stop", elem_id="stop", variant="stop")
                    retry_btn = gr.Button("Retry", elem_id="retry")
                    undo_btn = gr.Button("Undo", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Prior and current study", open=False, elem_id="studies"):
                    gr.Markdown(
                        "Each slot takes one image, or one volume: a NIfTI file, a zip of a DICOM series, or the "
                        "DICOM files of one series. They go with the next question, prior first, and the question "
                        "starts with a line saying which image is which. " + NOTICE_MD
                    )
                    with gr.Row():
                        with gr.Column():
                            prior_files = gr.File(
                                label="Prior study",
                                file_count="multiple",
                                file_types=FILE_TYPES,
                                type="filepath",
                                elem_id="prior-files",
                            )
                            prior_date = gr.Textbox(
                                label="Prior study date (optional)",
                                placeholder="YYYY-MM-DD",
                                max_lines=1,
                                elem_id="prior-date",
                            )
                        with gr.Column():
                            current_files = gr.File(
                                label="Current study",
                                file_count="multiple",
                                file_types=FILE_TYPES,
                                type="filepath",
                                elem_id="current-files",
                            )
                            current_date = gr.Textbox(
                                label="Current study date (optional)",
                                placeholder="YYYY-MM-DD",
                                max_lines=1,
                                elem_id="current-date",
                            )
                with gr.Accordion("Volume settings", open=False, elem_id="volume-settings"):
                    with gr.Row():
                        axis = gr.Dropdown(list(AXES), value="axial", label="Plane", elem_id="volume-axis")
                        n_slices = gr.Slider(
                            1,
                            max_slices,
                            value=min(DEFAULT_VOLUME_SLICES, max_slices),
                            step=1,
                            label=f"Slices the model sees (each counts as an image; at most {limits.max_images} "
                            "per conversation)",
                            elem_id="volume-slices",
                        )
                        model_windows = gr.Dropdown(
                            list(MODEL_WINDOWS),
                            value=DEFAULT_WINDOWS,
                            label="CT windows the model sees (MRI: scaled by percentiles)",
                            elem_id="volume-windows",
                        )
            with gr.Column(scale=2):
                preview = gr.Image(
                    label="Image preview (windowed)",
                    type="filepath",
                    interactive=False,
                    elem_id="preview",
                    height=280,
                )
                picker = gr.Dropdown(
                    choices=[], label="Show", visible=False, elem_id="preview-upload", interactive=True
                )
                # the range is set per volume when one is shown; the fixed bounds are those of any volume's slices
                scroller = gr.Slider(
                    0,
                    _MAX_SLICE_INDEX,
                    value=0,
                    step=1,
                    label="Slice",
                    visible=False,
                    elem_id="slice-scroller",
                )
                preview_window = gr.Dropdown(
                    PREVIEW_WINDOWS, value=AS_SENT, label="Window", visible=False, elem_id="preview-window"
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
            f"<small>Model: `{engine.model_id}` · OpenAI-compatible API at `/v1/chat/completions` "
            f"(speech: `/v1/audio/transcriptions`) · {NOT_FOR_CLINICAL_USE}</small>"
        )

        sampling = [temperature, top_p, max_new_tokens, seed]
        studies = [prior_files, prior_date, current_files, current_date]
        volume_settings = [axis, n_slices, model_windows]
        shown = [box, chatbot, preview, info]
        controls = [picker, scroller, preview_window]
        # One generation at a time per listener (the engine's slots are shared with the API).
        common = dict(concurrency_limit=limits.concurrency, concurrency_id="generate")
        sent = box.submit(
            chat, [box, session, *sampling, *studies, *volume_settings], shown, api_name="chat", **common
        )
        sent.success(clear_slots, None, studies, api_visibility="private")
        sent.then(viewer, [session], controls, api_visibility="private")
        retry_event = dict(fn=retry, inputs=[session, *sampling], outputs=shown, **common)
        retry_btn.click(api_name="retry", **retry_event)
        chatbot.retry(api_visibility="private", **retry_event)
        undo_btn.click(undo, [session], shown, api_name="undo").then(
            viewer, [session], controls, api_visibility="private"
        )
        chatbot.undo(undo, [session], shown, api_visibility="private").then(
            viewer, [session], controls, api_visibility="private"
        )
        clear_btn.click(clear, [session], [session, *shown], api_name="clear").then(
            viewer, [session], controls, api_visibility="private"
        )
        chatbot.clear(clear, [session], [session, *shown], api_visibility="private").then(
            viewer, [session], controls, api_visibility="private"
        )
        stop_btn.click(stop, [session], None, api_name="stop", queue=False)
        speech = dict(concurrency_limit=1, concurrency_id="speech")
        voice.stop_recording(speak, [voice, box], [box], api_name="transcribe", **speech)
        voice.upload(speak, [voice, box], [box], api_visibility="private", **speech)
        picker.input(select, [session, picker], [preview, info, scroller, preview_window], api_name="show")
        scroller.release(scroll, [session, scroller, preview_window], [preview, info], api_name="scroll")
        preview_window.input(
            scroll, [session, scroller, preview_window], [preview, info], api_visibility="private"
        )
    blocks.queue(max_size=limits.max_queue + limits.concurrency)
    return blocks
