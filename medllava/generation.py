"""Batched and streaming generation over `medllava.processing`, the one implementation used by eval and serve.

from medllava.generation import load, generate, stream
model, processor = load("~/.cache/medllava/base-112px")
[c.text for c in generate(model, processor, examples, max_new_tokens=32)]   # batched, left padded, greedy
for piece in stream(model, processor, example): print(piece, end="")         # token streaming
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from medllava.processing import encode


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
    completions = []
    for row, ids in enumerate(output[:, prompt_len:].tolist()):
        n, finish = len(ids), "length"
        for i, token in enumerate(ids):
            if token in end_ids:
                n, finish = i, "stop"
                break
        completions.append(
            Completion(
                text=processor.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                prompt_tokens=int(batch["attention_mask"][row].sum()),
                completion_tokens=n + (finish == "stop"),
                finish_reason=finish,
            )
        )
    return completions


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
