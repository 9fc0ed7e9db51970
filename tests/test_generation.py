"""Batched generation equals one-by-one generation; shared prefixes change nothing; streaming equals non-streaming;
stop works."""

import copy
import json
import random
import threading

import pytest
import torch
from conftest import random_image, tiny_model

from medllava.generation import SamplingParams, generate, generate_shared, shared_prefix_order, stream
from medllava.processing import encode
from medllava.schema import conversation, make_vqa_row, message


def _examples():
    questions = [
        "Is there a lesion?",
        "Which organ is shown in this image, and is it normal?",
        "Modality?",
        "Describe the finding in the upper left quadrant of the image in detail.",
    ]
    rows = [
        {"images": [random_image(i)], "messages": [message("user", q, 1)]} for i, q in enumerate(questions)
    ]
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


def test_shared_prefixes_run_in_bfloat16(lively):
    # the pixels are hashed to group questions by image; numpy has no bfloat16, so this once raised a TypeError
    model, processor = lively
    model = copy.deepcopy(model).to(torch.bfloat16)
    stats = {}
    shared = _shared(model, processor, _many_per_image()[:4], 4, stats, max_new_tokens=3)
    assert len(shared) == 4 and stats["prefix_images"] >= 1


def test_closing_a_stream_stops_its_generation_thread(model_processor):
    model, processor = model_processor
    before = threading.active_count()
    pieces = stream(model, processor, _examples()[0], max_new_tokens=2000)
    next(pieces)
    pieces.close()  # a client that stops reading
    assert threading.active_count() == before  # the generation thread has ended, not left running


# ---------------------------------------------------------------------------------------------------------------
# Shared prefixes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lively():
    """A tiny model whose greedy answers differ from prompt to prompt and image to image.

    `tiny_model` repeats the newline it is prompted with (every answer is empty), so equality would prove nothing;
    larger random LLM weights make each answer depend on every prompt token and on the image features.
    """
    model, processor = tiny_model(seed=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model, processor


QUESTIONS = [
    "Is there a lesion?",
    "Which organ is shown in this image, and is it normal?",
    "Modality?",
    "Describe the finding in the upper left quadrant of the image in detail.",
]


def _many_per_image() -> list[dict]:
    """3 images x 2-4 questions of different lengths, plus rows whose prefixes differ from their image's others."""
    images = [random_image(i) for i in range(3)]
    rows = [
        {"images": [im], "messages": [message("user", q, 1)]}
        for i, im in enumerate(images)
        for q in QUESTIONS[: 2 + i]
    ]
    rows += [
        # text only: they share the system prompt only
        {"images": [], "messages": [message("user", "A text-only question?", 0)]},
        {"images": [], "messages": [message("user", "Another question, longer, with no image?", 0)]},
        # image 0 under another system prompt: a prefix of its own
        {
            "images": [images[0]],
            "messages": [message("system", "Be terse."), message("user", QUESTIONS[0], 1)],
        },
        # image 1 with an earlier turn before the question
        {
            "images": [images[1]],
            "messages": conversation([(QUESTIONS[2], "CT")]) + [message("user", "Sure?")],
        },
        # the same question twice about image 2, the second time from another copy of the picture
        {"images": [images[2].copy()], "messages": [message("user", QUESTIONS[0], 1)]},
        # two images: grouped by both pictures, in order
        {"images": [images[1], images[0]], "messages": [message("user", "Same organ in both?", 2)]},
    ]
    return rows


def _shared(model, processor, examples, batch_size, stats=None, **kwargs):
    out = [None] * len(examples)
    for start, completions in generate_shared(
        model, processor, examples, batch_size=batch_size, stats=stats, **kwargs
    ):
        out[start : start + len(completions)] = completions
    return out


def test_shared_prefixes_give_the_answers_of_full_prompts(lively):
    model, processor = lively
    examples = _many_per_image()
    random.Random(0).shuffle(examples)  # batches mix images, prefix lengths and text-only rows
    alone = [generate(model, processor, [e], max_new_tokens=10)[0] for e in examples]
    assert len({c.text for c in alone}) > len(examples) // 2  # answers differ, so equality means something
    for batch_size in (1, 4, 64):
        stats = {}
        shared = _shared(model, processor, examples, batch_size, stats, max_new_tokens=10)
        assert [c.text for c in shared] == [c.text for c in alone]
        assert [(c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in shared] == [
            (c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in alone
        ]
        # each image's prefix ran once: images 0-2, image 0 again under its own system prompt, the pair
        assert stats["prefix_images"] == 3 + 1 + 2
        assert all(0 < c.cached_tokens < c.prompt_tokens for c in shared)


def test_shared_prefix_is_the_common_token_prefix(lively):
    model, processor = lively
    image, other = random_image(5), random_image(6)
    questions = ["Is there a lesion?", "Is there a mass?"]
    examples = [{"images": [image], "messages": [message("user", q, 1)]} for q in questions]
    ids = [encode(processor, [e], images_loaded=True)["input_ids"][0].tolist() for e in examples]
    common = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    after_image = max(i for i, t in enumerate(ids[0]) if t == model.config.image_token_id) + 1
    assert common > after_image + 2  # the ids share "\nIs there a" after the image
    stats = {}
    shared = _shared(model, processor, examples, 2, stats, max_new_tokens=3)
    assert [c.cached_tokens for c in shared] == [common, common]
    assert stats == {"prefix_tokens": common, "prefix_images": 1}
    # a question alone about its image: its prefix is cut to the other groups' length, so they run together
    alone = {"images": [other], "messages": [message("user", "Is this normal?", 1)]}
    stats = {}
    *_, only = _shared(model, processor, [*examples, alone], 3, stats, max_new_tokens=3)
    assert only.cached_tokens == common and stats == {"prefix_tokens": 2 * common, "prefix_images": 2}
    # ... and never below its last image token
    (only,) = _shared(model, processor, [alone], 2, max_new_tokens=3)
    assert only.cached_tokens == after_image


def test_shared_prefix_order_keeps_images_whole_and_batches_by_key():
    images = ["a", "b", "a", "c", "b", "a", "c", "c", "c"]
    keys = [3, 1, 2, 0, 0, 1, 2, 1, 0]
    chunks = shared_prefix_order(images, keys, chunk_size=5)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(images)))
    assert all(len(chunk) <= 5 for chunk in chunks)
    assert [sorted({images[i] for i in chunk}) for chunk in chunks] == [["a", "b"], ["c"]]
    assert all([keys[i] for i in chunk] == sorted(keys[i] for i in chunk) for chunk in chunks)
    # an image with more questions than a chunk holds is split
    assert [len(c) for c in shared_prefix_order(["x"] * 7, [0] * 7, chunk_size=3)] == [3, 3, 1]
    with pytest.raises(ValueError, match="chunk_size"):
        shared_prefix_order(images, keys, chunk_size=0)


def test_eval_generate_with_shared_prefixes_writes_the_rows_of_the_full_prompt_path(lively, tmp_path):
    from eval import generate as gen

    model, processor = lively
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "images").mkdir()
    for i in range(3):
        random_image(i, size=(40 + i, 36)).save(tmp_path / "images" / f"im{i}.png")
    answers = [("yes", "CLOSED"), ("liver", "OPEN"), ("no", "CLOSED"), ("ct", "OPEN")]
    with (tmp_path / "vqa.jsonl").open("w") as f:
        for i in range(11):
            question = QUESTIONS[i % 4] if i % 5 else "Is this normal?"
            image = [] if i == 10 else [f"images/im{i % 3}.png"]
            row = make_vqa_row(f"q{i:02d}", image, question, *answers[i % 4], modality="CT")
            f.write(json.dumps(row) + "\n")

    def run(output, *extra):
        data = str(tmp_path / "vqa.jsonl")
        args = ["--model", str(model_dir), "--data", data, "--output", str(output), "--max-new-tokens", "6"]
        summary = gen.run(gen.parse_args([*args, "--batch-size", "3", *extra]))
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        return summary, {
            r["id"]: {k: v for k, v in r.items() if k not in ("latency_s", "batch_size")} for r in rows
        }

    _, plain = run(tmp_path / "plain.jsonl", "--no-shared-prefix")
    assert len({r["prediction"] for r in plain.values()}) > 3
    _, shared = run(tmp_path / "shared.jsonl", "--prefix-chunk", "4")
    assert shared == plain
    # resumable: a file cut after its first lines is completed with the same rows
    cut = tmp_path / "resumed.jsonl"
    cut.write_text("".join((tmp_path / "shared.jsonl").read_text().splitlines(keepends=True)[:4]))
    summary, resumed = run(cut, "--prefix-chunk", "4")
    assert summary["answered_now"] == 7 and resumed == plain
