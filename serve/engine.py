"""The model held once per process, the limits every request is checked against, and `respond`.

`Engine.respond` is the one generator both the Gradio chat and the OpenAI-compatible API call. Requests take a
place in a `FairQueue` (arrival order, bounded) in front of `Limits.concurrency` slots; each slot is a row of one
dynamically batched decoding loop (`medllava.batching.Batcher`): requests that arrive while others generate join
them at the next decoding step, each with its own sampling parameters and stop conditions, and a greedy answer is
the same as when it is asked alone. A model the batcher cannot run (a stand-in with only `generate`, a language
model with sliding-window layers) is served one request per slot through `respond`, a thin wrapper over
`medllava.generation.stream` that makes sure an abandoned generation stops at the next token.

    engine = Engine.load("~/.cache/medllava/base-112px")
    for piece in engine.respond(images, messages, SamplingParams(max_new_tokens=64)):
        print(piece, end="")
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from medllava.batching import Batcher, supports_batching
from medllava.generation import SamplingParams, load, stream
from medllava.processing import MAX_IMAGE_PIXELS, count_tokens

NOT_FOR_CLINICAL_USE = (
    "Research prototype: not a medical device and not for clinical use. Answers can be wrong; "
    "do not use them to diagnose or treat anyone."
)
# Temperatures in (0, MIN_TEMPERATURE) are treated as 0 (greedy): dividing the logits by them overflows to inf/nan,
# and at any temperature this low sampling picks the most likely token anyway (vLLM treats them the same way).
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond any of these the API answers 4xx and the chat shows an error."""

    concurrency: int = 8  # generations running at once: rows of the decoding batch (docs/serve.md: speed)
    max_queue: int = 16  # requests allowed to wait for a slot; beyond it: 429
    max_queue_wait: float = 300.0  # seconds a request may wait for a slot; beyond it: 503
    max_body_bytes: int = 64 * 2**20  # whole HTTP request body (images travel base64-encoded: 4/3 larger)
    max_image_bytes: int = 20 * 2**20  # one image file (a chat upload or a decoded data: URL)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # one image (width x height, or rows x columns of a DICOM frame)
    # all the pixel data a DICOM or NIfTI file declares (frames, slices), checked before it is decompressed
    max_decoded_bytes: int = 256 * 2**20
    max_images: int = 4  # per conversation
    max_messages: int = 64
    max_prompt_tokens: int = 2048  # after image expansion
    max_new_tokens: int = 1024  # the largest max_tokens a request may set
    default_new_tokens: int = 256  # when a request does not set max_tokens


class Busy(RuntimeError):
    """Every generation slot is taken and the queue is full."""


class QueueTimeout(Busy):
    """A request waited `Limits.max_queue_wait` seconds without getting a slot."""


class Cancelled(RuntimeError):
    """A request was withdrawn (its client left, or Stop was pressed) while it waited for a slot."""


class FairQueue:
    """At most `slots` holders at once; everyone else waits in line, served strictly in arrival order.

    `admit()` hands out a `Ticket` at once (or raises `Busy` when `slots + max_waiting` tickets are out);
    `Ticket.wait()` blocks until the ticket is first in line and a slot is free, and `Ticket.close()` gives the
    slot (or the place in line) back. A newcomer never overtakes a waiting ticket, unlike a semaphore, where
    whichever thread asks right after a release wins. Waiting is bounded (`QueueTimeout`) and can be called off
    through an event (`Cancelled`), so a request whose client has gone leaves the line without running.
    """

    def __init__(self, slots: int, max_waiting: int):
        if slots < 1 or max_waiting < 0:
            raise ValueError("a FairQueue needs slots >= 1 and max_waiting >= 0")
        self.slots, self.max_waiting = slots, max_waiting
        self._cond = threading.Condition()
        self._line: collections.deque[Ticket] = collections.deque()  # waiting, in arrival order
        self._running = 0
        self._numbers = itertools.count()  # each ticket's place in the order of arrival

    @property
    def pending(self) -> int:
        """Tickets out: running plus waiting."""
        return self._running + len(self._line)

    def admit(self) -> Ticket:
        with self._cond:
            limit = self.slots + self.max_waiting
            if self.pending >= limit:
                raise Busy(
                    f"the server is busy: {self.pending} request(s) running or waiting, the limit is {limit} "
                    f"({self.slots} running + {self.max_waiting} queued); retry shortly"
                )
            ticket = Ticket(self, next(self._numbers))
            self._line.append(ticket)
            return ticket

    def position(self, ticket: Ticket) -> int:
        """How many tickets are ahead of this one in line (0: next), or -1 once it runs or has left."""
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else -1

    def _wait(self, ticket: Ticket, timeout: float | None, cancel: threading.Event | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if ticket.state != "waiting":
                if ticket.state == "closed":
                    raise RuntimeError("this ticket has been closed")
                return  # already running
            while not (self._line[0] is ticket and self._running < self.slots):
                if cancel is not None and cancel.is_set():
                    self._remove(ticket)
                    raise Cancelled("the request was withdrawn while it waited for a generation slot")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    ahead = self._line.index(ticket)
                    self._remove(ticket)
                    raise QueueTimeout(
                        f"the server is busy: waited {timeout:g} s for a generation slot with {ahead} request(s) "
                        f"still ahead in the queue; retry later"
                    )
                # an event cannot wake a Condition: look at `cancel` every 50 ms
                self._cond.wait(left if cancel is None else min(0.05, left if left is not None else 0.05))
            self._line.popleft()
            self._running += 1
            ticket.state = "running"
            self._cond.notify_all()  # the next in line may take another free slot

    def _remove(self, ticket: Ticket) -> None:  # with self._cond held
        self._line.remove(ticket)
        ticket.state = "closed"
        self._cond.notify_all()

    def _close(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.state == "waiting":
                self._remove(ticket)
            elif ticket.state == "running":
                self._running -= 1
                ticket.state = "closed"
                self._cond.notify_all()


class Ticket:
    """A place in a `FairQueue`: "waiting", then "running" once `wait()` returns, then "closed". Released once, by
    `close()`, by leaving a `with` block, or when garbage collected (a streamed response whose client left before
    it started never runs its generator). `number` is its place in the order of arrival (0, 1, 2, ...)."""

    def __init__(self, queue: FairQueue, number: int = 0):
        self._queue = queue
        self.number = number
        self.state = "waiting"

    def wait(self, timeout: float | None = None, cancel: threading.Event | None = None) -> None:
        """Block until this ticket holds a slot (at once if it already does); `QueueTimeout` after `timeout`
        seconds, `Cancelled` as soon as `cancel` is set. Either way the ticket has then left the line."""
        self._queue._wait(self, timeout, cancel)

    @property
    def position(self) -> int:
        return self._queue.position(self)

    def close(self) -> None:
        self._queue._close(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


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
            # runs `stream` to its end (within one token of the stop): the thread has finished
            for _ in pieces:
                pass


class Engine:
    """One loaded model, its limits, the queue that bounds concurrent generation and the batcher that runs it
    (shared by chat and API). `batching=None` batches whenever `medllava.batching.supports_batching(model)`."""

    def __init__(
        self,
        model,
        processor,
        model_id: str = "medllava",
        limits: Limits | None = None,
        source: str = "",
        aliases: Sequence[str] = (),
        batching: bool | None = None,
        image_prefix_cache: int | None = None,
    ):
        self.model, self.processor = model, processor
        self.model_id = model_id  # the name clients send as "model"
        self.source = source  # where the weights came from (directory or hub id)
        self.aliases = tuple(aliases)  # other accepted names, e.g. the --model argument as typed
        self.limits = limits or Limits()
        self.image_token = getattr(processor, "image_token", "<image>")
        self.queue = FairQueue(self.limits.concurrency, self.limits.max_queue)
        # No token is longer than this many characters (byte-level tokens: bytes >= characters), so text longer
        # than max_prompt_tokens x this cannot fit the prompt: refused before it is tokenised.
        tokenizer = getattr(processor, "tokenizer", processor)
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        if batching is None:
            batching = supports_batching(model)
        # one row per slot; every sampled row draws from its own seeded generator; `image_prefix_cache`: image
        # prefixes kept (None: the batcher's default, on in float32 only)
        self.batcher = (
            Batcher(
                model, processor, max_batch=self.limits.concurrency, image_prefix_cache=image_prefix_cache
            )
            if batching
            else None
        )
        # Unbatched path: torch's CPU random generator is process-global, so two sampled generations running at
        # once would draw from each other's stream and a `seed` would not reproduce. Sampled generations take this
        # lock there (greedy ones do not need it), so seeded sampling is reproducible at any concurrency.
        self._rng = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        model_id: str = "medllava",
        dtype: str = "float32",
        limits: Limits | None = None,
        aliases: Sequence[str] = (),
        batching: bool | None = None,
        image_prefix_cache: int | None = None,
    ) -> Engine:
        model, processor = load(str(model_dir), dtype=dtype)
        return cls(
            model,
            processor,
            model_id=model_id,
            limits=limits,
            source=str(model_dir),
            aliases=(str(model_dir), *aliases),
            batching=batching,
            image_prefix_cache=image_prefix_cache,
        )

    def admit(self) -> Ticket:
        """Take a place in the queue at once, or raise `Busy` when it is full (never blocks).

        Admission is separate from running so the HTTP API can answer 429 before it starts a streamed response.
        """
        return self.queue.admit()

    @property
    def pending(self) -> int:
        """Requests admitted and not finished (running or waiting for a slot)."""
        return self.queue.pending

    @contextlib.contextmanager
    def slot(self, ticket: Ticket | None = None, cancel: threading.Event | None = None):
        """Hold one generation slot (admitting first unless a ticket is given); waits in line while others run,
        at most `Limits.max_queue_wait` seconds (`QueueTimeout`), or until `cancel` is set (`Cancelled`). Yields the
        ticket."""
        ticket = ticket or self.admit()
        with ticket:
            ticket.wait(self.limits.max_queue_wait, cancel)
            yield ticket

    def prompt_tokens(self, messages: Sequence[dict]) -> int:
        return count_tokens(self.processor, {"messages": list(messages)})

    @property
    def max_text_chars(self) -> int:
        """Characters of message text beyond which a prompt is certainly over `max_prompt_tokens`."""
        return self.limits.max_prompt_tokens * self.max_token_chars

    def check_text(self, messages: Sequence[dict]) -> None:
        """The cheap bounds (message count, characters of text), checked before anything is tokenised."""
        limits = self.limits
        if len(messages) > limits.max_messages:
            raise ValueError(
                f"{len(messages)} messages in the conversation; the limit is {limits.max_messages}"
            )
        n = sum(
            len(m["content"])
            if isinstance(m["content"], str)
            else sum(len(p.get("text") or "") for p in m["content"])
            for m in messages
        )
        if n > self.max_text_chars:
            raise ValueError(
                f"the messages hold {n:,} characters of text, more than {limits.max_prompt_tokens} prompt tokens "
                f"can hold ({self.max_text_chars:,} characters at most); the limit is "
                f"{limits.max_prompt_tokens} tokens"
            )

    def check(self, images: Sequence[Image.Image], messages: Sequence[dict], params: SamplingParams) -> None:
        """Raise ValueError with a clear reason if a conversation is over a limit."""
        limits = self.limits
        if len(images) > limits.max_images:
            raise ValueError(f"{len(images)} images in the conversation; the limit is {limits.max_images}")
        if params.max_new_tokens > limits.max_new_tokens:
            raise ValueError(
                f"max tokens {params.max_new_tokens} is over the limit of {limits.max_new_tokens}"
            )
        self.check_text(messages)
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
        """The answer inside a generation slot: admitted to the queue (or `Busy`), then waiting in line for a slot,
        then a row of the batch (joining it in order of arrival), or a generation of its own if not batching.

        `params.stop_event` both stops a running generation (within one decoding step) and withdraws a waiting one
        (nothing is yielded). Closing the generator early stops the generation and returns once it has stopped.
        """
        if 0 < params.temperature < MIN_TEMPERATURE:
            params = replace(params, temperature=0.0)
        try:
            with self.slot(ticket, params.stop_event) as held:
                if params.stop_event is not None and params.stop_event.is_set():
                    return
                if self.batcher is not None:
                    example = {"images": list(images), "messages": list(messages)}
                    yield from self.batcher.stream(example, params, usage=usage, order=held.number)
                    return
                with self._rng if params.temperature > 0 else contextlib.nullcontext():
                    yield from respond(self.model, self.processor, images, messages, params, usage)
        except Cancelled:
            return
