"""Dynamic batching of streamed generations: requests that arrive while others run join them at the next step.

    batcher = Batcher(model, processor, max_batch=8)
    generation = batcher.submit({"images": [image], "messages": messages}, SamplingParams(max_new_tokens=64))
    for piece in generation:                       # text pieces, detokenised in the caller's thread
        print(piece, end="")
    generation.usage                               # {"prompt_tokens", "completion_tokens", "finish_reason"}

One worker thread (started when a request comes, gone when none is left) owns the running batch: a transformers
`DynamicCache` of shape (rows, kv_heads, T, head_dim) in which every row is left-padded, the attention mask
(rows, T) marking each row's real tokens, and the last token sampled for each row. Each turn of its loop:

1. rows whose request was withdrawn (`SamplingParams.stop_event` set, or the consumer closed its iterator) leave;
2. waiting requests join in arrival order (`order`, e.g. the server's queue ticket number), as many as there
   are free rows and the prefill budget allows. They are prefilled together in one forward, in a cache of
   their own that starts from the longest cached prefix each one has: the keys and values of its images'
   prefix (the prompt up to its last image token, kept from an earlier request with the same pixels and the
   same ids up to there: an LRU of `image_prefix_cache` entries), else those of the chat template's system
   prompt when the prompt starts with it, else nothing. Each row is laid out
   [padding][its cached prefix][padding][rest of its prompt] (prefixes right-aligned, rests left-padded), and
   only rows whose images are not cached pass their pixels, so a follow-up question about an image skips the
   vision tower and the prompt up to the image. The image prefixes of the other rows are then cut out of the
   prefill's cache into the LRU (attention is causal: a token's keys and values depend only on the tokens
   before it). Each joiner's first token comes from its prefill logits; then their cache and the batch's are
   left-padded to the same length and concatenated along the batch;
3. one decoding step for all rows: input (rows, 1), each row's position = its real tokens so far, mask + 1 column;
   each row samples with its own parameters and its own `torch.Generator` (greedy: argmax);
4. rows that ended (an end-of-turn token, max tokens) leave, and columns that are padding in every remaining row
   are cut off the cache.

Every row sees exactly the tokens and positions of its own unpadded prompt (padding is masked out and positions
come from the mask), so in float32 a greedy answer under load equals the answer given alone, and a seeded sampled
one too (each row draws from its own generator, seeded as `medllava.generation.generate` seeds torch's); tested in
tests/test_batching.py. (In bf16 a batch rounds differently from a single row, and answers under load can differ.)
The cache's layers grow in place (`RoomyLayer`) instead of concatenating the whole cache at every step. Sampling
applies transformers' own warpers in `generate`'s order (temperature, top-k from the model's generation config or
transformers' default of 50, top-p) and `torch.multinomial`, as `generate` does.

Text is detokenised incrementally in the consumer's thread (a short window of ids is decoded, as vLLM does), so
the worker only runs the model: no streamer thread, no per-token decoding of the whole answer in the loop.
Tried first: transformers' continuous batching (`generate_batch`, `ContinuousBatchingManager`) takes token ids
only (no pixel values, no input embeddings), so it cannot run a Llava model with images (docs/serve.md).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from medllava.generation import SamplingParams, _end_ids, image_prefix_key
from medllava.processing import encode

_END = object()  # the last item a generation's queue receives
# Image prefixes kept by default (in float32). One entry holds every layer's keys and values of the prompt up
# to its last image token: about 5 MB for the 135M default in float32 (30 layers x 2 x 3 kv heads x 64 x ~110
# tokens x 4 bytes), so 32 entries take about 160 MB.
IMAGE_PREFIX_ENTRIES = 32


def supports_batching(model) -> bool:
    """Whether `Batcher` can run this model: a torch module whose language model uses full attention in every
    layer (the cache surgery here assumes plain `DynamicLayer`s; sliding-window layers would need more)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        return False
    text = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"} and not getattr(text, "sliding_window", None)


class Detokenizer:
    """Text pieces from a growing list of token ids, each decoded once within a short window.

    The text of the ids from `prefix` to `read` has been emitted; new ids are decoded together with that window and
    the difference is the new piece (vLLM's incremental detokenisation). A piece ending in U+FFFD (a character cut
    between byte-level tokens) waits for the next id. The first piece loses its leading whitespace, as in `stream`.
    """

    def __init__(self, tokenizer, lock: threading.Lock | None = None):
        self.tokenizer, self.lock = tokenizer, lock or threading.Lock()
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.started = False

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(ids)
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if (text.endswith("\ufffd") and not final) or len(text) <= len(before):
            return ""
        piece = text[len(before) :]
        # the next window starts at the ids just emitted (a character boundary): cleanup rules see their neighbour
        self.prefix, self.read = self.read, len(self.ids)
        if not self.started:  # the first piece loses its leading whitespace, as in `generation.stream`
            piece, self.started = piece.lstrip(), True
        return piece


def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers with room to spare along the sequence: a
        decoding step writes its position in place, where `DynamicLayer.update` copies the whole cache
        (`torch.cat`) at every step, rows x length x layers. Anything that replaces `keys`/`values` (rows leaving
        or joining) simply gets a new buffer at the next update."""

        room = 64  # positions added whenever a buffer is (re)allocated

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            buffer = getattr(self, "_buffers", None)
            if buffer is None or not self._in(buffer[0], self.keys, length + new, key_states):
                shape = (*key_states.shape[:2], length + new + self.room, key_states.shape[-1])
                buffer = key_states.new_empty(shape), value_states.new_empty(shape)
                if length:
                    buffer[0][:, :, :length] = self.keys
                    buffer[1][:, :, :length] = self.values
                self._buffers = buffer
            buffer[0][:, :, length : length + new] = key_states
            buffer[1][:, :, length : length + new] = value_states
            self.keys, self.values = buffer[0][:, :, : length + new], buffer[1][:, :, : length + new]
            return self.keys, self.values

        @staticmethod
        def _in(buffer: torch.Tensor, keys: torch.Tensor, needed: int, new: torch.Tensor) -> bool:
            """Whether `keys` is the start of `buffer` and the buffer holds `needed` positions of `new`'s rows."""
            return (
                buffer.shape[:2] == new.shape[:2]
                and buffer.shape[-2] >= needed
                and (
                    keys.numel() == 0
                    or (keys.data_ptr() == buffer.data_ptr() and keys.stride() == buffer.stride())
                )
            )

    return RoomyLayer


_ROOMY = None


def new_cache(config):
    """A `DynamicCache` for `config` whose layers grow in place (`RoomyLayer`) instead of by `torch.cat`."""
    global _ROOMY
    from transformers import DynamicCache

    _ROOMY = _ROOMY or _roomy_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_ROOMY() for _ in cache.layers]
    return cache


@dataclass
class _Prompt:
    ids: torch.Tensor  # (L,) token ids, image tokens expanded
    pixels: torch.Tensor | None  # (n_images, 3, H, W) or None
    # the image-prefix cache's key: (digests of the pixels, ids up to the last image token); None if no image
    key: tuple | None = None
    floor: int = 0  # index of the last image token + 1: the length of the image prefix


class Generation:
    """One request's handle: iterate it for text pieces; `usage` is filled when it ends. Closing the iterator early
    (or `cancel()`) withdraws the request and returns once the worker has dropped its row."""

    def __init__(self, batcher: Batcher, prompt: _Prompt, params: SamplingParams, order: float):
        self.batcher, self.prompt, self.params, self.order = batcher, prompt, params, order
        self.stop = params.stop_event or threading.Event()
        self.items: queue.SimpleQueue = queue.SimpleQueue()  # lists of token ids, then _END
        self.done = threading.Event()  # set once the worker holds no state for it
        self.usage: dict = {}
        self.error: BaseException | None = None
        # the answer's token ids (end-of-turn token excluded), filled by the consumer
        self.ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        detok = Detokenizer(self.batcher.tokenizer, self.batcher.tokenizer_lock)
        finished = False
        try:
            ended = False
            while not ended:
                new, item = [], self.items.get()
                while True:  # everything that has arrived, decoded at once
                    if item is _END:
                        ended = True
                        break
                    new += item
                    try:
                        item = self.items.get_nowait()
                    except queue.Empty:
                        break
                self.ids += new
                piece = detok.add(new, final=ended)
                if piece:
                    yield piece
            if self.error is not None:
                raise self.error
            finished = True
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Withdraw the request; returns when its row has left the batch (within one decoding step)."""
        self.stop.set()
        self.batcher._withdraw(self)
        self.done.wait()
        self.batcher._join_if_idle()

    def text(self) -> str:
        return "".join(self)


@dataclass
class _Row:
    gen: Generation
    generator: torch.Generator | None  # None: greedy
    warpers: list = field(default_factory=list)
    produced: int = 0  # tokens sampled so far (end-of-turn included)


class Batcher:
    """Runs submitted generations in one dynamically batched decoding loop (see the module docstring).

    `max_batch` bounds the rows decoded together; `prefill_tokens` bounds the prompt tokens prefilled in one turn
    of the loop (at least one request joins per turn), so requests arriving together do not stall the running
    streams for all their prefills at once, and the first in line gets its first token first. With `prefix_cache`
    (default: in float32) the keys and values of the chat template's fixed opening (the system prompt, about a third
    of a one-image prompt) are computed once and every prompt that starts with it prefills only the rest; in bf16
    the prefix computed apart rounds differently from the whole prompt and changed answers, so it is off there.
    `image_prefix_cache` bounds the image prefixes kept (an LRU; 0 turns it off; default:
    `IMAGE_PREFIX_ENTRIES` in float32 and float64, 0 otherwise, for the same reason): a prompt with the same
    images and the same ids up to its last image token (a follow-up question about an image, the next turn of
    a chat) prefills only the rest, without its pixels. `prefix_hits` counts the prompts that found theirs.
    """

    def __init__(
        self,
        model,
        processor,
        max_batch: int = 8,
        prefill_tokens: int = 512,
        prefix_cache: bool | None = None,
        image_prefix_cache: int | None = None,
    ):
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError("a Batcher needs max_batch >= 1 and prefill_tokens >= 1")
        if image_prefix_cache is not None and image_prefix_cache < 0:
            raise ValueError(f"image_prefix_cache must be >= 0 (0 turns it off), not {image_prefix_cache}")
        if not supports_batching(model):
            raise ValueError(f"{type(model).__name__} cannot be batched here (see supports_batching)")
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # fast tokenizers refuse concurrent use while padding settings change (encode sets them): one lock
        self.tokenizer_lock = threading.Lock()
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.end_ids = frozenset(_end_ids(model, processor))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        config = model.generation_config
        self.top_k = getattr(config, "top_k", None)
        self.top_k = 50 if self.top_k is None else self.top_k  # transformers' default for sampling
        self._lock = threading.Lock()
        self._pending: list[Generation] = []
        self._thread: threading.Thread | None = None
        self._arrivals = itertools.count()
        # the running batch (worker thread only)
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, T) long, 1 = a real token
        self._last: torch.Tensor | None = None  # (rows, 1) the token each row feeds next
        # the chat template's fixed opening (its system prompt): computed once, reused by every prompt that has it.
        # By default in float32 only: in bf16 the prefix prefilled apart rounds differently and changes answers.
        exact = model.dtype in (torch.float32, torch.float64)
        if prefix_cache is None:
            prefix_cache = exact
        if image_prefix_cache is None:
            image_prefix_cache = IMAGE_PREFIX_ENTRIES if exact else 0
        self.image_prefix_cache = image_prefix_cache
        # key -> per layer (keys, values) of shape (1, kv_heads, floor, head_dim), least recently used first
        self._image_prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.prefix_hits = 0  # prompts whose image prefix came from the cache
        self.prefix_ids = self._template_prefix() if prefix_cache else []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.steps = 0  # decoding steps run (for tests and benchmarks)
        self.prefills = 0
        # seconds spent prefilling and decoding, and rows decoded summed over all steps (for benchmarks)
        self.timings = {"prefill": 0.0, "decode": 0.0, "rows": 0}

    # -- the caller's side ------------------------------------------------------------------------------------

    def encode(self, example: dict, images_loaded: bool = True) -> _Prompt:
        with self.tokenizer_lock:
            batch = encode(self.processor, [example], add_generation_prompt=True, images_loaded=images_loaded)
        pixels = batch.get("pixel_values")
        extra = set(batch.keys()) - {"input_ids", "attention_mask", "pixel_values"}
        if extra:
            raise ValueError(f"the processor returned inputs the batcher does not pass on: {sorted(extra)}")
        prompt = _Prompt(batch["input_ids"][0], None if pixels is None else pixels.to(self.model.dtype))
        if prompt.pixels is not None and self.image_prefix_cache:
            # in the caller's thread: the worker only looks the key up
            floor, key = image_prefix_key(prompt.ids, pixels, self.model.config.image_token_id)
            # at least one token after the prefix runs, for the first answer token's logits
            if 0 < floor < len(prompt.ids):
                prompt.key, prompt.floor = key, floor
        return prompt

    def submit(
        self,
        example: dict,
        params: SamplingParams,
        images_loaded: bool = True,
        order: float | None = None,
    ) -> Generation:
        """Queue one {"images", "messages"} example; it joins the batch at the next turn of the loop, after every
        waiting request with a smaller `order` (default: submission order)."""
        prompt = self.encode(example, images_loaded)
        with self._lock:
            number = next(self._arrivals)
            generation = Generation(self, prompt, params, number if order is None else order)
            self._pending.append(generation)
            self._pending.sort(key=lambda g: g.order)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="medllava-batcher", daemon=True)
                self._thread.start()
        return generation

    def stream(
        self, example: dict, params: SamplingParams, usage: dict | None = None, **kwargs
    ) -> Iterator[str]:
        """`submit` and yield its pieces; `usage` (a dict) is filled at the end (prompt_tokens, completion_tokens,
        finish_reason), as `generation.stream` fills it, and also when the consumer stops early."""
        generation = self.submit(example, params, **kwargs)
        try:
            yield from generation
        finally:  # also when the consumer stops early: the worker has filled in what it generated
            if usage is not None:
                usage.update(generation.usage)

    @property
    def running(self) -> int:
        return len(self._rows)

    def _withdraw(self, gen: Generation) -> None:
        """A request that has not joined yet leaves the line at once (one that runs leaves at the next step)."""
        with self._lock:
            if gen not in self._pending:
                return
            self._pending.remove(gen)
        gen.usage.update(prompt_tokens=len(gen.prompt.ids), completion_tokens=0, finish_reason="stop")
        self._finish(gen)

    def _join_if_idle(self) -> None:
        """Wait for the worker to exit if nothing is left for it, so a caller that has closed the last generation
        leaves no thread behind; returns at once if other requests keep it busy."""
        while True:
            with self._lock:
                thread = self._thread
                busy = bool(self._pending or self._rows)
            if thread is None or busy or thread is threading.current_thread():
                return
            thread.join(0.01)

    # -- the worker -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        joiners: list[Generation] = []  # out of the queue, not yet rows while `_prefill` runs
        try:
            with torch.inference_mode():
                while True:
                    self._drop_withdrawn()
                    with self._lock:
                        joiners = self._take_joiners()
                        if not joiners and not self._rows:
                            self._thread = None
                            self._reset()
                            return
                    if joiners:
                        self._prefill(joiners)
                    if self._rows:
                        self._decode()
        except BaseException as error:  # noqa: BLE001 - every waiting consumer gets the error, none hangs
            with self._lock:
                everyone = [row.gen for row in self._rows] + self._pending
                everyone += [gen for gen in joiners if gen not in everyone and not gen.done.is_set()]
                self._pending = []
                self._rows = []
                self._reset()
                self._thread = None
            for gen in everyone:
                self._finish(gen, error)

    def _take_joiners(self) -> list[Generation]:  # with self._lock held
        free = self.max_batch - len(self._rows)
        joiners, tokens = [], 0
        while self._pending and len(joiners) < free:
            gen = self._pending[0]
            if joiners and tokens + len(gen.prompt.ids) > self.prefill_tokens:
                break
            self._pending.pop(0)
            if gen.stop.is_set():  # withdrawn while it waited: never runs
                gen.usage.update(prompt_tokens=len(gen.prompt.ids), completion_tokens=0, finish_reason="stop")
                self._finish(gen)
                continue
            joiners.append(gen)
            tokens += len(gen.prompt.ids)
        return joiners

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._last = [], None, None, None

    @staticmethod
    def _finish(gen: Generation, error: BaseException | None = None) -> None:
        gen.error = error
        gen.items.put(_END)
        gen.done.set()

    def _new_row(self, gen: Generation) -> _Row:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        params = gen.params
        if params.temperature <= 0:
            return _Row(gen, None)
        generator = torch.Generator(device=self.model.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        warpers = []
        if params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=params.top_p))
        return _Row(gen, generator, warpers)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """One token per row from its last-position logits (rows, vocab), each with its own parameters."""
        logits = logits.to(torch.float32)
        tokens = logits.argmax(-1).tolist()  # greedy rows
        for r, row in enumerate(rows):
            if row.generator is None:
                continue
            scores = logits[r : r + 1]
            for warper in row.warpers:
                scores = warper(None, scores)
            probs = torch.softmax(scores, dim=-1)
            tokens[r] = int(torch.multinomial(probs, num_samples=1, generator=row.generator))
        return tokens

    def _emit(self, rows: list[_Row], tokens: list[int]) -> list[bool]:
        """Hand each row's token to its consumer; True for rows that have now ended."""
        ended = []
        for row, token in zip(rows, tokens, strict=True):
            row.produced += 1
            stop = token in self.end_ids
            if not stop:
                row.gen.items.put([token])
            length = row.produced >= row.gen.params.max_new_tokens
            if stop or length:
                row.gen.usage.update(
                    prompt_tokens=len(row.gen.prompt.ids),
                    completion_tokens=row.produced,
                    finish_reason="stop" if stop else "length",
                )
            ended.append(stop or length)
        return ended

    def _drop_withdrawn(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.gen.stop.is_set()]
        for i in gone:
            row = self._rows[i]
            row.gen.usage.update(
                prompt_tokens=len(row.gen.prompt.ids), completion_tokens=row.produced, finish_reason="stop"
            )
        self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        """Drop rows from the batch, then the columns that are padding in every row left."""
        if not indices:
            return
        leaving = [self._rows[i].gen for i in indices]
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        with self._lock:
            self._rows = [self._rows[i] for i in keep]
            if not keep:
                self._cache, self._mask, self._last = None, None, None
            else:
                index = torch.tensor(keep, device=self._mask.device)
                mask = self._mask[index]
                cut = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
                self._mask, self._last = mask[:, cut:], self._last[index]
                for layer in self._cache.layers:
                    layer.keys = layer.keys[index, :, cut:]
                    layer.values = layer.values[index, :, cut:]
        for gen in leaving:
            self._finish(gen)

    def _template_prefix(self) -> list[int]:
        """The token ids every prompt without a system message starts with (the chat template's system prompt and
        the opening of the user turn): the common prefix of two prompts that differ only in the user's text."""
        ids = [
            self.encode(
                {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
            ).ids.tolist()
            for text in ("a", "b")
        ]
        n = next((i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b), 0)
        return [] if self.model.config.image_token_id in ids[0][:n] else ids[0][:n]

    def _template_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The template prefix's keys and values per layer, (1, kv_heads, len(prefix_ids), head_dim); computed
        once."""
        if self._prefix_kv is None:
            cache = new_cache(self.model.config)
            ids = torch.tensor([self.prefix_ids], device=self.model.device)
            self.model.model(input_ids=ids, past_key_values=cache, use_cache=True)  # no LM head needed
            self._prefix_kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        return self._prefix_kv

    def _cached_prefix(self, gen: Generation) -> tuple[int, list | None, bool]:
        """The longest cached prefix of the joiner's prompt: (its length, its keys and values, whether it is
        an image-prefix hit)."""
        prompt, p = gen.prompt, len(self.prefix_ids)
        entry = self._image_prefixes.get(prompt.key) if prompt.key is not None else None
        if entry is not None:
            self._image_prefixes.move_to_end(prompt.key)
            return prompt.floor, entry, True
        if p and prompt.ids[:p].tolist() == self.prefix_ids:
            return p, self._template_kv(), False
        return 0, None, False

    def _prefix_rows(self, kvs: list, skips: list[int], length: int, more: int):
        """A cache whose row r holds the cached prefix `kvs[r]` right-aligned in `length` columns (zeros to
        its left: masked, and finite so that a zero attention weight gives zero), with room for `more`
        positions."""
        cache = new_cache(self.model.config)
        if not length:
            return cache
        first = next(kv for kv in kvs if kv is not None)
        for n, layer in enumerate(cache.layers):
            # (rows, kv_heads, length, head_dim), in a buffer `RoomyLayer.update` appends the rests to
            _, heads, _, dim = first[n][0].shape
            shape = (len(kvs), heads, length + more + layer.room, dim)
            buffers = first[n][0].new_empty(shape), first[n][1].new_empty(shape)
            keys, values = buffers[0][:, :, :length], buffers[1][:, :, :length]
            keys.zero_()
            values.zero_()
            for r, (kv, skip) in enumerate(zip(kvs, skips, strict=True)):
                if kv is not None:
                    keys[r, :, length - skip :] = kv[n][0][0]
                    values[r, :, length - skip :] = kv[n][1][0]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values, layer._buffers = keys, values, buffers
        return cache

    def _store_image_prefix(self, key: tuple, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._image_prefixes[key] = kv
        self._image_prefixes.move_to_end(key)
        while len(self._image_prefixes) > self.image_prefix_cache:
            self._image_prefixes.popitem(last=False)  # the least recently used

    def _prefill(self, joiners: list[Generation]) -> None:
        """One prefill forward for the joiners, each from its longest cached prefix (`_cached_prefix`), then
        their first tokens sampled and their rows merged into the batch.

        Row r of the cache is laid out [padding][cached prefix of row r][padding][rest of row r]: prefixes
        right-aligned to the longest cached prefix among the joiners, rests left-padded to the longest rest
        (as `medllava.generation.generate_shared` lays out its rows). The mask marks the padding and positions
        come from the mask, so each row sees exactly its own prompt at its own positions. Only rows whose
        images are not cached pass their pixels; their image prefixes are then sliced out of the prefill's
        cache into the LRU.
        """
        device = self.model.device
        start = time.perf_counter()
        try:
            skips, kvs, hits = zip(*(self._cached_prefix(g) for g in joiners), strict=True)
            cached = max(skips)
            rests = [g.prompt.ids[skip:] for g, skip in zip(joiners, skips, strict=True)]
            longest = max(len(rest) for rest in rests)
            ids = torch.full((len(joiners), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(joiners), cached + longest), dtype=torch.long)
            for r, (rest, skip) in enumerate(zip(rests, skips, strict=True)):
                ids[r, longest - len(rest) :] = rest
                mask[r, cached - skip : cached] = 1
                mask[r, cached + longest - len(rest) :] = 1
            # a hit's rest holds no image token: only the others' images run through the vision tower
            pixels = [g.prompt.pixels for g, hit in zip(joiners, hits, strict=True) if not hit]
            pixels = [p for p in pixels if p is not None]
            # (J, longest): each row's positions count its real tokens from 0
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
            cache = self._prefix_rows(list(kvs), list(skips), cached, longest)
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                pixel_values=torch.cat(pixels).to(device) if pixels else None,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as error:  # noqa: BLE001 - only the joiners fail; the running rows go on
            for gen in joiners:
                self._finish(gen, error)
            return
        self.prefills += 1
        self.prefix_hits += sum(hits)
        self.timings["prefill"] += time.perf_counter() - start
        for r, gen in enumerate(joiners):
            key = gen.prompt.key
            if key is None or hits[r] or key in self._image_prefixes or not self.image_prefix_cache:
                continue
            # the row's real columns in order; its first `floor` are the image prefix
            columns = mask[r].nonzero().squeeze(1)[: gen.prompt.floor].to(device)
            kv = [
                (
                    layer.keys[r : r + 1].index_select(2, columns),
                    layer.values[r : r + 1].index_select(2, columns),
                )
                for layer in cache.layers
            ]
            self._store_image_prefix(key, kv)
        rows = [self._new_row(g) for g in joiners]
        tokens = self._sample(rows, out.logits[:, -1])
        ended = self._emit(rows, tokens)
        stay = [r for r, e in enumerate(ended) if not e]
        for r, e in enumerate(ended):
            if e:
                self._finish(rows[r].gen)
        if not stay:
            return
        index = torch.tensor(stay, device=device)
        mask, last = mask.to(device)[index], torch.tensor([[tokens[r]] for r in stay], device=device)
        cut = int((mask.sum(0) == 0).long().cumprod(0).sum())
        mask = mask[:, cut:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]
        with self._lock:
            if not self._rows:
                self._cache, self._mask, self._last = cache, mask, last
            else:
                self._merge(cache, mask, last)
            self._rows += [rows[r] for r in stay]

    def _merge(self, cache, mask: torch.Tensor, last: torch.Tensor) -> None:
        """Append the joiners' rows to the batch: both left-padded to the longer length, then concatenated."""
        have, new = self._mask.shape[1], mask.shape[1]
        length = max(have, new)
        self._mask = torch.cat([F.pad(self._mask, (length - have, 0)), F.pad(mask, (length - new, 0))])
        self._last = torch.cat([self._last, last])
        for ours, theirs in zip(self._cache.layers, cache.layers, strict=True):
            # (rows, kv_heads, T, head_dim): pad dim -2 on the left
            ours.keys = torch.cat(
                [F.pad(ours.keys, (0, 0, length - have, 0)), F.pad(theirs.keys, (0, 0, length - new, 0))]
            )
            ours.values = torch.cat(
                [F.pad(ours.values, (0, 0, length - have, 0)), F.pad(theirs.values, (0, 0, length - new, 0))]
            )

    def _decode(self) -> None:
        rows = list(self._rows)
        positions = self._mask.sum(1, keepdim=True)  # (rows, 1): the new token's position in its own sequence
        mask = F.pad(self._mask, (0, 1), value=1)
        start = time.perf_counter()
        out = self.model(
            input_ids=self._last,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self.steps += 1
        self.timings["decode"] += time.perf_counter() - start
        self.timings["rows"] += len(rows)
        self._mask = mask
        tokens = self._sample(rows, out.logits[:, -1])
        self._last = torch.tensor([[t] for t in tokens], device=self._mask.device)
        ended = self._emit(rows, tokens)
        self._remove([r for r, e in enumerate(ended) if e])
