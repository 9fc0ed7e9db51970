"""The model held once per process, the limits every request is checked against, and `respond`.

`respond` is the one generator both the Gradio chat and the OpenAI-compatible API call; it is a thin wrapper over
`medllava.generation.stream` (the one generation path) that makes sure an abandoned generation stops at the next
token. `Engine` adds what a server needs around it: a bounded queue in front of a few generation slots.

    engine = Engine.load("~/.cache/medllava/base-112px")
    for piece in engine.respond(images, messages, SamplingParams(max_new_tokens=64)):
        print(piece, end="")
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from medllava.generation import SamplingParams, load, stream
from medllava.processing import count_tokens

NOT_FOR_CLINICAL_USE = (
    "Research prototype: not a medical device and not for clinical use. Answers can be wrong; "
    "do not use them to diagnose or treat anyone."
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond any of these the API answers 4xx and the chat shows an error."""

    concurrency: int = 1  # generations running at once (CPU: one or a few)
    max_queue: int = 16  # requests allowed to wait for a slot; beyond it: 429
    max_body_bytes: int = 64 * 2**20  # whole HTTP request body (images travel base64-encoded: 4/3 larger)
    max_image_bytes: int = 20 * 2**20  # one image file (a chat upload or a decoded data: URL)
    max_image_pixels: int = 40_000_000  # one image (width x height, or rows x columns of a DICOM frame)
    max_images: int = 4  # per conversation
    max_messages: int = 64
    max_prompt_tokens: int = 2048  # after image expansion
    max_new_tokens: int = 1024  # the largest max_tokens a request may set
    default_new_tokens: int = 256  # when a request does not set max_tokens


class Busy(RuntimeError):
    """Every generation slot is taken and the queue is full."""


def respond(
    model,
    processor,
    images: Sequence[Image.Image],
    messages: Sequence[dict],
    params: SamplingParams,
    usage: dict | None = None,
) -> Iterator[str]:
    """Yield the assistant's answer to a conversation ({"images", "messages"} schema) piece by piece.

    Pure: everything it uses comes in through its arguments. If the consumer stops early (client gone, Stop
    pressed, generator closed), the generation thread is told to stop and drained before this returns, so a
    caller that holds a generation slot around it never releases the slot while the model is still running.
    """
    stop = params.stop_event or threading.Event()
    pieces = stream(
        model,
        processor,
        {"images": list(images), "messages": list(messages)},
        replace(params, stop_event=stop),
        images_loaded=True,
        usage=usage,
    )
    finished = False
    try:
        # Not `yield from`: that would forward close() straight to `stream`, which would then return without
        # waiting for its generation thread, and that thread could draw from the next request's seeded RNG.
        for piece in pieces:  # noqa: UP028 (see above)
            yield piece
        finished = True
    finally:
        if not finished:
            stop.set()
            for (
                _
            ) in pieces:  # runs `stream` to its end (within one token of the stop): the thread has finished
                pass


class Engine:
    """One loaded model, its limits, and the slots that bound concurrent generation (shared by chat and API)."""

    def __init__(
        self,
        model,
        processor,
        model_id: str = "medllava",
        limits: Limits | None = None,
        source: str = "",
        aliases: Sequence[str] = (),
    ):
        self.model, self.processor = model, processor
        self.model_id = model_id  # the name clients send as "model"
        self.source = source  # where the weights came from (directory or hub id)
        self.aliases = tuple(aliases)  # other accepted names, e.g. the --model argument as typed
        self.limits = limits or Limits()
        self.image_token = getattr(processor, "image_token", "<image>")
        self._slots = threading.BoundedSemaphore(self.limits.concurrency)
        self._lock = threading.Lock()
        self._pending = 0
        # torch's CPU random generator is process-global: two sampled generations running at once would draw
        # from each other's stream and a `seed` would not reproduce. Sampled generations take this lock (greedy
        # ones do not need it), so seeded sampling is reproducible at any concurrency.
        self._rng = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        model_id: str = "medllava",
        dtype: str = "float32",
        limits: Limits | None = None,
        aliases: Sequence[str] = (),
    ) -> Engine:
        model, processor = load(str(model_dir), dtype=dtype)
        return cls(
            model,
            processor,
            model_id=model_id,
            limits=limits,
            source=str(model_dir),
            aliases=(str(model_dir), *aliases),
        )

    def admit(self) -> Ticket:
        """Take a place in the bounded queue at once, or raise `Busy` when it is full (never blocks).

        Admission is separate from running so the HTTP API can answer 429 before it starts a streamed response.
        """
        with self._lock:
            limit = self.limits.concurrency + self.limits.max_queue
            if self._pending >= limit:
                raise Busy(
                    f"the server is busy: {self._pending} request(s) running or waiting, the limit is {limit} "
                    f"({self.limits.concurrency} running + {self.limits.max_queue} queued); retry shortly"
                )
            self._pending += 1
        return Ticket(self)

    def _leave(self) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        """Requests admitted and not finished (running or waiting for a slot)."""
        return self._pending

    @contextlib.contextmanager
    def slot(self, ticket: Ticket | None = None):
        """Hold one generation slot (admitting first unless a ticket is given); waits while others run."""
        ticket = ticket or self.admit()
        try:
            with self._slots:
                yield
        finally:
            ticket.close()

    def prompt_tokens(self, messages: Sequence[dict]) -> int:
        return count_tokens(self.processor, {"messages": list(messages)})

    def check(self, images: Sequence[Image.Image], messages: Sequence[dict], params: SamplingParams) -> None:
        """Raise ValueError with a clear reason if a conversation is over a limit."""
        limits = self.limits
        if len(images) > limits.max_images:
            raise ValueError(f"{len(images)} images in the conversation; the limit is {limits.max_images}")
        if len(messages) > limits.max_messages:
            raise ValueError(
                f"{len(messages)} messages in the conversation; the limit is {limits.max_messages}"
            )
        if params.max_new_tokens > limits.max_new_tokens:
            raise ValueError(
                f"max tokens {params.max_new_tokens} is over the limit of {limits.max_new_tokens}"
            )
        n = self.prompt_tokens(messages)
        if n > limits.max_prompt_tokens:
            raise ValueError(
                f"the prompt is {n} tokens (images included); the limit is {limits.max_prompt_tokens}"
            )

    def respond(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[dict],
        params: SamplingParams,
        usage: dict | None = None,
        ticket: Ticket | None = None,
    ) -> Iterator[str]:
        """`respond` inside a generation slot: admitted to the queue (or `Busy`), then waiting for a slot."""
        with self.slot(ticket), self._rng if params.temperature > 0 else contextlib.nullcontext():
            yield from respond(self.model, self.processor, images, messages, params, usage)


class Ticket:
    """A place in an engine's queue; released once, by `close()`, by `Engine.slot`, or when garbage collected
    (a streamed response whose client left before it started never runs its generator)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._engine._leave()

    def __del__(self):
        self.close()
