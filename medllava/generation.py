"""Batched and streaming generation over `medllava.processing`, the one implementation used by eval and serve.

from medllava.generation import load, generate, stream
model, processor = load("~/.cache/medllava/base-112px")
[c.text for c in generate(model, processor, examples, max_new_tokens=32)]   # batched, left padded, greedy
for piece in stream(model, processor, example): print(piece, end="")         # token streaming
for start, completions in generate_shared(model, processor, examples, batch_size=16): ...
    # the prompt prefix that examples about the same image share (system prompt + image + ...) is computed once

Shared prefixes: examples whose images have the same pixels and whose prompts have the same token ids up to
their last image token form a group. The group's longest common token prefix (found on the ids of the full
prompts, so BPE merges at the boundary cannot differ) runs through the model once, with the pixels; its KV cache
is then copied into the rows of every batch that asks about that image, and `generate` continues each row from
the cached prefix with text ids only. Rows are laid out [left padding][prefix][padding][rest of the prompt], the
attention mask marks the padding and positions come from the mask, so every row sees exactly the positions and
tokens of its own unpadded prompt: greedy answers equal `generate`'s (tests/test_generation.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from medllava.processing import encode
from medllava.token_budget import enable_pooling


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_event: threading.Event | None = field(
        default=None, repr=False
    )  # set it to stop a running generation

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stop_event is not None:
            kwargs["stopping_criteria"] = _stopping(self.stop_event)
        return kwargs


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length"
    cached_tokens: int = 0  # prompt tokens whose KV cache came from a shared prefix (generate_shared)


def _stopping(event: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([_EventStop()])


def load(model_dir: str, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load a Llava checkpoint (a MedLLaVA directory, any HF Llava dir or hub id) and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # rows over the image-token budget arrive with fewer tokens per image (medllava.token_budget)
    enable_pooling(model)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def _end_ids(model, processor) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != processor.tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def _model_inputs(model, processor, examples: Sequence[dict], images_loaded: bool):
    batch = encode(
        processor, examples, add_generation_prompt=True, padding_side="left", images_loaded=images_loaded
    )
    batch = batch.to(model.device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def batch_key(answer_type: str, n_images: int, question: str) -> tuple:
    """Questions are answered grouped by answer type and prompt size: a batch runs until its longest answer
    ends, so yes/no questions batched together stop after a few tokens, and similar lengths waste less padding."""
    return (answer_type, n_images, len(question))


@torch.inference_mode()
def generate(
    model,
    processor,
    examples: Sequence[dict],
    params: SamplingParams | None = None,
    images_loaded: bool = False,
    **overrides,
) -> list[Completion]:
    """Answer a batch of {"images", "messages"} examples in one left-padded `generate` call."""
    params = params or SamplingParams(**overrides)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    batch = _model_inputs(model, processor, examples, images_loaded)
    prompt_len = batch["input_ids"].shape[1]
    end_ids = _end_ids(model, processor)
    output = model.generate(
        **batch,
        eos_token_id=sorted(end_ids),
        pad_token_id=processor.tokenizer.pad_token_id,
        **params.generate_kwargs(),
    )
    prompt_tokens = batch["attention_mask"].sum(1).tolist()
    return _completions(processor, output[:, prompt_len:].tolist(), end_ids, prompt_tokens)


def _completions(
    processor,
    new_ids: list[list[int]],
    end_ids: set[int],
    prompt_tokens: list[int],
    cached: list[int] | None = None,
) -> list[Completion]:
    """Completions from each row's generated ids: cut at the first end-of-turn id, decoded."""
    completions = []
    for row, ids in enumerate(new_ids):
        n, finish = len(ids), "length"
        for i, token in enumerate(ids):
            if token in end_ids:
                n, finish = i, "stop"
                break
        completions.append(
            Completion(
                text=processor.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                prompt_tokens=int(prompt_tokens[row]),
                completion_tokens=n + (finish == "stop"),
                finish_reason=finish,
                cached_tokens=cached[row] if cached else 0,
            )
        )
    return completions


# ---------------------------------------------------------------------------------------------------------------
# Shared prefixes
# ---------------------------------------------------------------------------------------------------------------


def shared_prefix_order(
    image_keys: Sequence[Hashable], batch_keys: Sequence, chunk_size: int
) -> list[list[int]]:
    """Indices of the examples in chunks for `generate_shared`: the examples about one image together (in order of
    first appearance; a group larger than `chunk_size` is split), at most `chunk_size` per chunk, each chunk in
    `batch_keys` order so its batches still group answer types and prompt lengths."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(image_keys):
        groups.setdefault(key, []).append(i)
    chunks, current = [], []
    for members in groups.values():
        for start in range(0, len(members), chunk_size):
            piece = members[start : start + chunk_size]
            if current and len(current) + len(piece) > chunk_size:
                chunks.append(current)
                current = []
            current += piece
    if current:
        chunks.append(current)
    return [sorted(chunk, key=lambda i: (batch_keys[i], i)) for chunk in chunks]


@dataclass
class _Prompt:
    ids: list[int]  # the full prompt's token ids, unpadded (image tokens expanded)
    pixels: torch.Tensor | None  # (n_images, 3, H, W) pixel values of its images, or None
    group: int = -1  # index of its shared-prefix group
    prefix: int = 0  # length of its group's shared prefix


def _prompts(model, processor, examples: Sequence[dict], images_loaded: bool) -> list[_Prompt]:
    """Tokenise every example as `generate` does (one processor call), then unpad each row."""
    batch = _model_inputs(model, processor, examples, images_loaded)
    pixels = batch.get("pixel_values")
    prompts, offset = [], 0
    for row, example in enumerate(examples):
        mask = batch["attention_mask"][row].bool()
        n = len(example.get("images") or [])
        prompts.append(
            _Prompt(batch["input_ids"][row][mask].tolist(), pixels[offset : offset + n] if n else None)
        )
        offset += n
    return prompts


def image_prefix_key(
    ids: Sequence[int], pixels: torch.Tensor | None, image_token_id: int
) -> tuple[int, tuple]:
    """(floor, key) of a prompt's image prefix: floor = the index of its last image token + 1 (0 without images),
    key = (the digests of its images' pixels, its ids up to floor). Prompts with equal keys share that prefix's
    keys and values (eval's shared prefixes, the server's image-prefix cache)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    floor = max((j + 1 for j, t in enumerate(ids) if t == image_token_id), default=0)
    digests = () if pixels is None else tuple(_digest(p) for p in pixels)
    return floor, (digests, tuple(ids[:floor]))


def _group_prefixes(prompts: list[_Prompt], image_token_id: int) -> list[list[int]]:
    """Group prompts that share their images (same pixels) and their ids up to the last image token, and set each
    prompt's group and the group's prefix length.

    A group of several prompts shares their longest common token prefix, at least one token short of each (the
    last prompt token must run to give the first answer token's logits). Prefixes are then evened out so that
    they run in few forward passes: each is cut to the length most groups of several share (the system prompt,
    the image and what follows it up to the question), never below its last image token; a prompt alone in its
    group gains nothing from a longer one, and the rest of its prompt runs with its batch's questions.
    """
    groups: dict[tuple, list[int]] = {}
    floors = []  # per prompt: the prefix must hold every image token
    for i, prompt in enumerate(prompts):
        floor, key = image_prefix_key(prompt.ids, prompt.pixels, image_token_id)
        floors.append(floor)
        groups.setdefault(key, []).append(i)
    members_of = list(groups.values())
    common = []
    for members in members_of:
        first = prompts[members[0]].ids
        n = min(len(prompts[i].ids) for i in members) - 1
        for i in members[1:]:
            ids = prompts[i].ids
            n = next((j for j in range(n) if ids[j] != first[j]), n)
        common.append(n)
    shared = [n for n, members in zip(common, members_of, strict=True) if len(members) > 1]
    target = Counter(shared or [floors[m[0]] for m in members_of]).most_common(1)[0][0]
    for g, members in enumerate(members_of):
        n = max(floors[members[0]], min(common[g], target))
        for i in members:
            prompts[i].group, prompts[i].prefix = g, n
    return members_of


def _digest(pixels: torch.Tensor) -> bytes:
    """A hash of a pixel tensor's bytes (any dtype: numpy has no bfloat16, so 2-byte floats are read as int16)."""
    pixels = pixels.detach().contiguous().cpu()
    if pixels.dtype in (torch.bfloat16, torch.float16):
        pixels = pixels.view(torch.int16)
    return hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).digest()


def _prefill(model, prompts: list[_Prompt], groups: list[list[int]], batch_size: int, stats: dict | None):
    """Run every group's prefix once (with its pixels) and return its KV cache: per layer (keys, values) of shape
    (groups, kv_heads, longest prefix, head_dim), each group's prefix right-aligned (zeros to its left)."""
    from transformers import DynamicCache

    lengths = [prompts[members[0]].prefix for members in groups]
    longest = max(lengths)
    if longest == 0:
        return None
    by_length: dict[int, list[int]] = {}
    for g, n in enumerate(lengths):
        if n:
            by_length.setdefault(n, []).append(g)
    layers = None
    for n, gs in sorted(by_length.items()):
        for start in range(0, len(gs), batch_size):
            part = gs[start : start + batch_size]
            firsts = [prompts[groups[g][0]] for g in part]
            ids = torch.tensor([p.ids[:n] for p in firsts], device=model.device)  # (g, n)
            pixels = [p.pixels for p in firsts if p.pixels is not None]
            cache = DynamicCache(config=model.config)
            # the base model only: the LM head would score every prefix position for nothing
            pixel_values = torch.cat(pixels) if pixels else None
            model.model(input_ids=ids, pixel_values=pixel_values, past_key_values=cache, use_cache=True)
            if layers is None:
                shapes = [
                    (len(groups), layer.keys.shape[1], longest, layer.keys.shape[3]) for layer in cache.layers
                ]
                layers = [
                    (layer.keys.new_zeros(shape), layer.values.new_zeros(shape))
                    for layer, shape in zip(cache.layers, shapes, strict=True)
                ]
            index = torch.tensor(part, device=model.device)
            for (keys, values), layer in zip(layers, cache.layers, strict=True):
                keys[index, :, longest - n :] = layer.keys  # (g, kv_heads, n, head_dim)
                values[index, :, longest - n :] = layer.values
            if stats is not None:
                stats["prefix_tokens"] = stats.get("prefix_tokens", 0) + n * len(part)
                stats["prefix_images"] = stats.get("prefix_images", 0) + sum(len(p) for p in pixels)
    return layers


@torch.inference_mode()
def generate_shared(
    model,
    processor,
    examples: Sequence[dict],
    params: SamplingParams | None = None,
    images_loaded: bool = False,
    batch_size: int = 16,
    stats: dict | None = None,
    **overrides,
) -> Iterator[tuple[int, list[Completion]]]:
    """Answer the examples in batches of `batch_size` (in the order given), computing each shared prompt prefix
    once; yields (start, completions of examples[start : start + len(completions)]) after each batch.

    Give it a chunk of examples about a few images (`shared_prefix_order`): all of its prefixes are kept in memory
    until the last batch (about 5 MB per image for the 135M default in fp32). `stats`, if a dict, gets the counts
    of prefix tokens and images that ran (`prefix_tokens`, `prefix_images`).
    """
    from transformers import DynamicCache

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    params = params or SamplingParams(**overrides)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    if not examples:
        return
    prompts = _prompts(model, processor, examples, images_loaded)
    groups = _group_prefixes(prompts, model.config.image_token_id)
    cached = _prefill(model, prompts, groups, batch_size, stats)
    end_ids = _end_ids(model, processor)
    pad = processor.tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        prefix = max(p.prefix for p in rows)
        rest = max(len(p.ids) - p.prefix for p in rows)
        # each row: [pad][its prefix][pad][the rest of its prompt]; prefixes right-aligned like the cache
        ids = torch.full((len(rows), prefix + rest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            tail = p.ids[p.prefix :]
            ids[r, prefix - p.prefix : prefix] = torch.tensor(p.ids[: p.prefix], dtype=torch.long)
            ids[r, prefix + rest - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[r, prefix - p.prefix : prefix] = 1
            mask[r, prefix + rest - len(tail) :] = 1
        if (ids[:, prefix:] == model.config.image_token_id).any():
            raise RuntimeError("an image token after the shared prefix: the prefix must hold every image")
        kwargs = {}
        if prefix:
            index = torch.tensor([p.group for p in rows], device=model.device)
            longest = cached[0][0].shape[2]
            data = [(k[index, :, longest - prefix :], v[index, :, longest - prefix :]) for k, v in cached]
            kwargs["past_key_values"] = DynamicCache(data, config=model.config)
        output = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            eos_token_id=sorted(end_ids),
            pad_token_id=pad,
            **kwargs,
            **params.generate_kwargs(),
        )
        new = output[:, prefix + rest :].tolist()
        prompt_tokens = [len(p.ids) for p in rows]
        yield start, _completions(processor, new, end_ids, prompt_tokens, [p.prefix for p in rows])


def stream(
    model,
    processor,
    example: dict,
    params: SamplingParams | None = None,
    images_loaded: bool = False,
    usage: dict | None = None,
    **overrides,
) -> Iterator[str]:
    """Yield the answer to one example piece by piece as tokens are generated.

    If `usage` is a dict, it is filled with prompt_tokens / completion_tokens / finish_reason at the end.
    """
    from transformers import TextIteratorStreamer

    params = params or SamplingParams(**overrides)
    if params.stop_event is None:  # always stoppable, so closing this generator ends the generation thread
        params = dataclasses.replace(params, stop_event=threading.Event())
    if params.seed is not None:
        torch.manual_seed(params.seed)
    batch = _model_inputs(model, processor, [example], images_loaded)
    end_ids = _end_ids(model, processor)
    streamer = TextIteratorStreamer(
        processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
    )
    result: dict = {}

    def run():
        try:
            with torch.inference_mode():
                result["output"] = model.generate(
                    **batch,
                    streamer=streamer,
                    eos_token_id=sorted(end_ids),
                    pad_token_id=processor.tokenizer.pad_token_id,
                    **params.generate_kwargs(),
                )
        except BaseException as e:  # surfaced to the caller below
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first, drained = True, False
    try:
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), False
            if piece:
                yield piece
        drained = True
    finally:  # also on close() by a caller that stops reading: stop generating and wait for the thread
        if not drained:
            params.stop_event.set()
            for _ in streamer:  # the thread ends the stream after its current step
                pass
        thread.join()
    if "error" in result:
        raise result["error"]
    if usage is not None:
        new = result["output"][0, batch["input_ids"].shape[1] :].tolist()
        stopped = any(t in end_ids for t in new)
        n = next((i + 1 for i, t in enumerate(new) if t in end_ids), len(new))
        usage.update(
            prompt_tokens=int(batch["attention_mask"].sum()),
            completion_tokens=n,
            finish_reason="stop"
            if stopped or (params.stop_event and params.stop_event.is_set())
            else "length",
        )
