"""Batched generation equals one-by-one generation; streaming equals non-streaming; stop works."""

import threading

import pytest
import torch
from conftest import random_image, tiny_model

from medllava.generation import SamplingParams, generate, stream
from medllava.schema import message


def _examples():
    questions = [
        "Is there a lesion?",
        "Which organ is shown in this image, and is it normal?",
        "Modality?",
        "Describe the finding in the upper left quadrant of the image in detail.",
    ]
    rows = [{"images": [random_image(i)], "messages": [message("user", q, 1)]} for i, q in enumerate(questions)]
    rows.append({"images": [], "messages": [message("user", "A text-only question?", 0)]})
    return rows


@pytest.fixture(scope="module")
def model_processor():
    # A larger tiny model trained for nothing still has peaked logits, so ties in argmax are not an issue.
    return tiny_model(seed=3)


def test_batched_greedy_equals_sequential(model_processor):
    model, processor = model_processor
    examples = _examples()
    batched = generate(model, processor, examples, max_new_tokens=12)
    sequential = [generate(model, processor, [e], max_new_tokens=12)[0] for e in examples]
    assert [c.text for c in batched] == [c.text for c in sequential]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in sequential]
    assert all(c.prompt_tokens > 0 for c in batched)
    assert batched[0].prompt_tokens > batched[-1].prompt_tokens  # image tokens counted, padding not


def test_stream_yields_the_same_text_as_generate(model_processor):
    model, processor = model_processor
    example = _examples()[1]
    usage = {}
    pieces = list(stream(model, processor, example, max_new_tokens=12, usage=usage))
    (completion,) = generate(model, processor, [example], max_new_tokens=12)
    assert "".join(pieces).strip() == completion.text
    assert usage["completion_tokens"] == completion.completion_tokens
    assert usage["prompt_tokens"] == completion.prompt_tokens


def test_sampling_is_reproducible_with_a_seed(model_processor):
    model, processor = model_processor
    example = _examples()[:1]
    a = generate(model, processor, example, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    b = generate(model, processor, example, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    assert a[0].text == b[0].text


def test_stop_event_ends_generation_early(model_processor):
    model, processor = model_processor
    event = threading.Event()
    event.set()
    params = SamplingParams(max_new_tokens=40, stop_event=event)
    (completion,) = generate(model, processor, _examples()[:1], params)
    assert completion.completion_tokens <= 1


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_generation_in_bfloat16_runs(model_processor):
    model, processor = tiny_model(seed=3)
    model = model.to(torch.bfloat16)
    (completion,) = generate(model, processor, _examples()[:1], max_new_tokens=4)
    assert completion.completion_tokens >= 1


def test_closing_a_stream_stops_its_generation_thread(model_processor):
    model, processor = model_processor
    before = threading.active_count()
    pieces = stream(model, processor, _examples()[0], max_new_tokens=2000)
    next(pieces)
    pieces.close()  # a client that stops reading
    assert threading.active_count() == before  # the generation thread has ended, not left running
