"""Dynamic batching (`medllava.batching`): answers under load equal answers given alone; and the vLLM path.

The tiny random model of conftest answers every prompt with the same newline token, which would make equality
trivial; here its language model's weight matrices are scaled up so its greedy answers differ from prompt to
prompt and a row that saw another row's tokens, positions or padding would answer differently.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import random_image, tiny_model
from test_serve import image_part, png_bytes, start_server

from medllava.batching import Batcher, Detokenizer
from medllava.generation import SamplingParams, generate
from serve.app import build_app
from serve.engine import Engine, Limits

N_CLIENTS = 16


@pytest.fixture(scope="module")
def sharp():
    """(model, processor): the tiny model with its LLM's matrices x6, and an extra end-of-turn token (one that
    some greedy answers reach) so that some answers end by an end token and others by max tokens."""
    model, processor = tiny_model()
    with torch.no_grad():
        for name, weight in model.model.language_model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.mul_(6)
    first = generate(model, processor, [example(0)], SamplingParams(max_new_tokens=8), images_loaded=True)[0]
    ids = processor.tokenizer(first.text, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [*(eos if isinstance(eos, list) else [eos]), ids[2]]
    return model, processor


def example(i: int) -> dict:
    """Client i: 0, 1 or 2 images (different pixels), a question of 1 to 4 sentences, a system turn for some."""
    images = [random_image(i + k, size=(40 + 8 * k, 32)) for k in range(i % 3)]
    text = f"Question {i}: " + " ".join(
        ["What does this show?", "Is it normal?", "Describe it.", "Why?"][: 1 + i % 4]
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}
    ]
    if i % 5 == 0:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": f"Case {i * 7919}."}]})
    return {"images": images, "messages": messages}


def params(i: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=4 + (i * 7) % 19, **kwargs)


def alone(batcher: Batcher, i: int, p: SamplingParams | None = None) -> tuple[list[int], dict]:
    generation = batcher.submit(example(i), p or params(i))
    "".join(generation)
    return generation.ids, generation.usage


def test_greedy_answers_under_load_equal_answers_alone(sharp):
    model, processor = sharp
    batcher = Batcher(model, processor, max_batch=N_CLIENTS)
    single = [alone(batcher, i) for i in range(N_CLIENTS)]
    # alone, the batcher answers as the evaluation path (one `model.generate` per question) does
    for i, (ids, usage) in enumerate(single):
        reference = generate(model, processor, [example(i)], params(i), images_loaded=True)[0]
        text = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert (text, usage["completion_tokens"], usage["finish_reason"]) == (
            reference.text,
            reference.completion_tokens,
            reference.finish_reason,
        ), i
    reasons = {usage["finish_reason"] for _, usage in single}
    assert reasons == {"stop", "length"}  # both stop conditions are exercised
    assert len({tuple(ids) for ids, _ in single}) >= N_CLIENTS - 2  # a swap between rows would show

    steps_alone = batcher.steps
    results: dict[int, tuple] = {}
    cancelled = max(range(N_CLIENTS), key=lambda i: len(single[i][0]))  # the longest answer leaves mid-way
    assert len(single[cancelled][0]) >= 6
    joined_busy = []
    late = threading.Event()

    def client(i: int) -> None:
        if i >= N_CLIENTS // 2:  # the second half joins a running batch
            late.wait()
            joined_busy.append(batcher.running)
        generation = batcher.submit(example(i), params(i))
        pieces = iter(generation)
        for _ in pieces:
            if i == cancelled and len(generation.ids) >= 3:
                produced = len(generation.ids) + generation.items.qsize()  # read or waiting to be read
                pieces.close()  # the client leaves mid-way
                results[i] = (list(generation.ids), generation.usage, produced)
                return
        results[i] = (generation.ids, generation.usage, None)

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(N_CLIENTS)]
        deadline = time.monotonic() + 60
        while batcher.steps < steps_alone + 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        late.set()
        for future in futures:
            future.result()
    assert any(joined_busy), "no client joined a running batch"
    assert batcher.steps - steps_alone < steps_alone / 2  # they really ran together
    for i in range(N_CLIENTS):
        ids, usage, produced = results[i]
        if i == cancelled:
            assert ids == single[i][0][: len(ids)] and usage["finish_reason"] == "stop"
            assert usage["completion_tokens"] - produced <= 2  # stopped within two decoding steps
            assert usage["completion_tokens"] < len(single[i][0])
        else:
            assert (ids, usage) == single[i], i
    assert batcher.running == 0


def test_seeded_sampling_under_load_equals_alone_and_generate(sharp):
    model, processor = sharp
    batcher = Batcher(model, processor, max_batch=8)
    sampled = [
        params(i, temperature=0.7 + 0.1 * (i % 3), top_p=0.9 if i % 2 else 1.0, seed=100 + i)
        for i in range(8)
    ]
    sampled[3] = params(3)  # a greedy row among sampled ones
    single = [alone(batcher, i, sampled[i]) for i in range(8)]
    for i in (0, 1, 4):  # each row's own generator, seeded as `generate` seeds torch's: the same draws
        reference = generate(model, processor, [example(i)], sampled[i], images_loaded=True)[0]
        assert processor.tokenizer.decode(single[i][0], skip_special_tokens=True).strip() == reference.text
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: alone(batcher, i, sampled[i]), range(8)))
    assert together == single


class _Prefills:
    """Records the prompt of every prefill (a forward with more than one input token) by its 'Question N'; while
    `hold` is clear, the model waits before running anything (`entered` tells that it has been called)."""

    def __init__(self, model, processor, fail_on: int | None = None):
        self.questions: list[int] = []
        self.lengths: list[list[int]] = []  # the ids each prefill fed, per row
        self.tokenizer, self.fail_on = processor.tokenizer, fail_on
        self.hold, self.entered = threading.Event(), threading.Event()
        self.hold.set()
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.entered.set()
        self.hold.wait(60)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            for row in ids:
                self.lengths.append(row[row != self.tokenizer.pad_token_id].tolist())
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                number = int(text.split("Question ")[1].split(":")[0])
                self.questions.append(number)
                if number == self.fail_on:
                    raise RuntimeError(f"prefill of question {number} failed")

    def remove(self):
        self.handle.remove()


def test_waiting_requests_join_in_order_and_a_withdrawn_one_never_runs(sharp):
    model, processor = sharp
    batcher = Batcher(model, processor, max_batch=1)
    prefills = _Prefills(model, processor)
    try:
        prefills.hold.clear()
        busy = batcher.submit(example(0), params(0))
        assert prefills.entered.wait(60)  # the only row is taken (the model waits): the rest wait in line
        later = batcher.submit(example(1), params(1), order=10)
        gone = batcher.submit(example(2), params(2), order=5)
        earlier = batcher.submit(example(3), params(3), order=3)
        gone.cancel()  # withdrawn while it waits: leaves at once
        assert gone.usage == {
            "prompt_tokens": len(gone.prompt.ids),
            "completion_tokens": 0,
            "finish_reason": "stop",
        }
        prefills.hold.set()
        for generation in (busy, later, earlier):
            generation.text()
            assert generation.usage["completion_tokens"] >= 1
    finally:
        prefills.hold.set()
        prefills.remove()
    assert prefills.questions == [0, 3, 1]
    assert batcher.running == 0


def test_a_failed_prefill_fails_only_its_request(sharp):
    model, processor = sharp
    batcher = Batcher(model, processor, max_batch=4)
    expected = alone(batcher, 4)
    prefills = _Prefills(model, processor, fail_on=7)
    try:
        prefills.hold.clear()
        running = batcher.submit(example(4), params(4))
        assert prefills.entered.wait(60)
        failing = batcher.submit(example(7), params(7))  # joins while question 4 runs
        prefills.hold.set()
        with pytest.raises(RuntimeError, match="prefill of question 7 failed"):
            failing.text()
        running.text()
    finally:
        prefills.hold.set()
        prefills.remove()
    assert prefills.questions == [4, 7]
    assert (running.ids, running.usage) == expected


def test_an_error_after_the_prefill_forward_reaches_the_joiners(sharp, monkeypatch):
    """Joiners are out of the queue and not yet rows while their first tokens are sampled: an error there (e.g.
    `torch.multinomial` refusing NaN probabilities) must reach them too, not leave their consumers waiting."""
    model, processor = sharp
    batcher = Batcher(model, processor, max_batch=4)

    def broken(rows, logits):
        raise RuntimeError("probability tensor contains nan")

    monkeypatch.setattr(batcher, "_sample", broken)
    generation = batcher.submit(example(1), SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    failed = []

    def consume():
        with pytest.raises(RuntimeError, match="contains nan") as error:
            generation.text()
        failed.append(error)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(30)
    assert failed and generation.done.is_set(), "the request never ended"
    assert batcher.running == 0 and batcher._thread is None


def test_the_cached_template_prefix_changes_no_answer(sharp):
    model, processor = sharp
    cached, plain = Batcher(model, processor), Batcher(model, processor, prefix_cache=False)
    assert processor.tokenizer.decode(cached.prefix_ids).startswith("<|im_start|>system\n")
    assert cached.prefix_ids and not plain.prefix_ids
    prefills = _Prefills(model, processor)
    try:
        for i in range(6):  # with and without a system message of their own (example 0 and 5 have one)
            assert alone(cached, i) == alone(plain, i), i
    finally:
        prefills.remove()
    assert prefills.questions == [q for i in range(6) for q in (i, i)]
    fed = [len(ids) for ids in prefills.lengths]
    # the cached prefix is not fed again, except to prompts that do not start with it
    assert [fed[2 * i] < fed[2 * i + 1] for i in range(6)] == [i % 5 != 0 for i in range(6)]


def test_detokenizer_pieces_join_to_the_decoded_text(tiny):
    tokenizer = tiny[1].tokenizer
    text = " Résumé: 肺结节 3 mm, ✓ no change 🫁🙂.\nNext line\t(tab) — done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    pieces = [detok.add([token], final=k == len(ids) - 1) for k, token in enumerate(ids)]
    assert pieces[0] == "R"  # the first piece loses its leading space, as `generation.stream`'s does
    assert "".join(pieces) == tokenizer.decode(ids)[1:] == text[1:]
    assert not any(
        "\ufffd" in piece for piece in pieces
    )  # a character split between tokens waits for its end
    assert sum(bool(p) for p in pieces) > len(ids) // 2  # and the text still streams


# ---------------------------------------------------------------------------------------------------------------
# Through the API: 16 streaming clients at once, one leaving mid-way
# ---------------------------------------------------------------------------------------------------------------


def _messages(i: int) -> list[dict]:
    text = f"Question {i}: " + "Describe it. " * (1 + i % 4)
    parts = [image_part(png_bytes(i % 3, size=(40 + 8 * (i % 2), 32)))] * (i % 3)
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _stream(url: str, i: int, leave_after: int | None = None) -> str:
    body = {"model": "medllava", "messages": _messages(i), "max_tokens": 4 + (i * 5) % 13, "stream": True}
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                if leave_after is not None and len(text) >= leave_after:
                    return text
    return text


def test_sixteen_streaming_api_clients_get_the_answers_they_get_alone(sharp):
    engine = Engine(*sharp, model_id="medllava", limits=Limits(concurrency=N_CLIENTS, max_prompt_tokens=600))
    server, thread, url = start_server(build_app(engine))
    try:
        sequential = [_stream(url, i) for i in range(N_CLIENTS)]
        assert len(set(sequential)) >= N_CLIENTS - 2
        steps = engine.batcher.steps
        with ThreadPoolExecutor(N_CLIENTS + 1) as pool:
            leaving = pool.submit(_stream, url, N_CLIENTS, 1)  # reads its first characters and hangs up
            concurrent = list(pool.map(lambda i: _stream(url, i), range(N_CLIENTS)))
            leaving.result()
        assert concurrent == sequential
        assert engine.batcher.steps - steps < (steps + 1) / 2  # batched: far fewer decoding steps
        deadline = time.monotonic() + 30
        while engine.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.pending == 0 and engine.batcher.running == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# vLLM: checkpoints with a tower vLLM builds carry every config field its Llava loader reads
# ---------------------------------------------------------------------------------------------------------------


def _tower(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_cls, model_cls = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
    }[kind]
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return model_cls(config_cls(**size, image_size=28, patch_size=14))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_checkpoint_with_a_clip_or_siglip_tower_has_what_vllm_reads(kind, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaConfig

    from medllava.assets import llm_dir
    from medllava.modeling import build_model

    tokenizer = AutoTokenizer.from_pretrained(llm_dir())
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    model, processor = build_model(vision=_tower(kind), llm=llm, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    vision, text = saved["vision_config"], saved["text_config"]

    # Fields read by vLLM 0.33.0 (vllm/model_executor/models/...), file:line:
    # registry.py:504 picks the model class by the top-level architecture
    assert saved["architectures"] == ["LlavaForConditionalGeneration"]
    # llava.py:446-483 (init_vision_tower_for_llava) and vision.py:75-83 build only these towers, by config class
    # (anything else, DINOv2 included, is NotImplementedError "Unsupported vision config")
    assert vision["model_type"] == {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[kind]
    config = LlavaConfig.from_pretrained(tmp_path)  # how vLLM reads it: through transformers
    assert (
        type(config.vision_config).__name__
        == {"clip": "CLIPVisionConfig", "siglip": "SiglipVisionConfig"}[kind]
    )
    # llava.py:158-162 (LlavaLikeConfig), 272 and 534-537: the image token id, inside the text vocabulary
    assert saved["image_token_index"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert 0 <= saved["image_token_index"] < text["vocab_size"]
    # llava.py:433-434 (_get_num_hidden_layers): a feature layer within the tower's layers
    assert isinstance(saved["vision_feature_layer"], int)
    assert -vision["num_hidden_layers"] <= saved["vision_feature_layer"] < vision["num_hidden_layers"]
    # llava.py:546-550 and 559-564 (the projector): activation, bias, both hidden sizes
    assert saved["projector_hidden_act"] == "gelu" and isinstance(saved["multimodal_projector_bias"], bool)
    assert vision["hidden_size"] == 32 and text["hidden_size"] == 64
    # llava.py:541-545, 568-573 (init_vllm_registered_model(hf_config=config.text_config)): the LM class by name
    assert text["architectures"] == ["LlamaForCausalLM"] and text["model_type"] == "llama"
    # llava.py:595: pixel values must be vision_config.image_size square, the size our processor resizes to
    assert vision["image_size"] == 28 == processor.image_processor.size["height"]
    # clip.py:82-98, siglip.py:238-255 and vision.py:186-203 (get_num_selected_vision_tokens): vLLM's count of
    # image tokens, (image_size / patch_size)^2 (+1 CLS for CLIP, dropped by "default"), equals ours
    assert saved["vision_feature_select_strategy"] == {"clip": "default", "siglip": "full"}[kind]
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    vllm_tokens = grid + (kind == "clip") - (saved["vision_feature_select_strategy"] == "default")
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    prompt = reloaded.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], tokenize=False
    )
    ids = reloaded(text=[prompt], images=[random_image()], return_tensors="pt")["input_ids"][0]
    assert int((ids == saved["image_token_index"]).sum()) == vllm_tokens == saved["image_seq_length"]
    # llava.py:505-512 (hf_to_vllm_mapper) renames transformers' new weight names to vLLM's modules; vLLM's towers
    # keep a `vision_model.` level (clip.py:742-748, siglip.py:819-826) that transformers 5 does not save, and an
    # unknown name stops the loader (utils.py:438-448): `serve.vllm_export` writes the copy vLLM loads
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from serve.vllm_export import export

    out = export(tmp_path, tmp_path.parent / f"{tmp_path.name}-vllm")
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    renames = {
        "model.language_model.": "language_model.model.",
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "lm_head.": "language_model.lm_head.",
    }
    for old, new in renames.items():
        names = [new + name[len(old) :] if name.startswith(old) else name for name in names]
    modules = (
        "language_model.model.",
        "language_model.lm_head.",
        "vision_tower.vision_model.",
        "multi_modal_projector.",
    )
    assert names and all(name.startswith(modules) for name in names), sorted(names)[:5]
    assert any(name.startswith("vision_tower.vision_model.") for name in names)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    # and transformers still loads the copy, weight for weight
    copy = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(copy[name], tensor) for name, tensor in model.state_dict().items())


def test_vllm_export_refuses_the_dinov2_default(tiny_model_dir, tmp_path):
    from serve.vllm_export import export

    with pytest.raises(ValueError, match="not 'dinov2'.*python -m serve"):
        export(tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# The image-prefix cache: a prompt with the images and the ids up to its last image token of an earlier one
# ------------------------------------------------------------------------------------------------------------


def ask(seeds: list[int], question: str, turns: Sequence[str] = (), system: str | None = None) -> dict:
    """A chat about the images `random_image(seed)`: earlier turns (question, answer, ...) then `question`."""
    images = [random_image(seed, size=(40 + 8 * seed, 32)) for seed in seeds]
    texts = [*turns, question]
    messages = [
        {"role": "user" if k % 2 == 0 else "assistant", "content": [{"type": "text", "text": text}]}
        for k, text in enumerate(texts)
    ]
    messages[0]["content"] = [{"type": "image"}] * len(images) + messages[0]["content"]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return {"images": images, "messages": messages}


class _Forwards:
    """Records every prefill (a forward with more than one input token): its rows and its number of
    images; while `hold` is clear the model waits before running anything (`entered`: it has been called)."""

    def __init__(self, model):
        self.prefills: list[tuple[int, int]] = []  # (rows, images) per prefill
        self.hold, self.entered = threading.Event(), threading.Event()
        self.hold.set()
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.entered.set()
        self.hold.wait(60)
        ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
        if ids is not None and ids.shape[1] > 1:
            self.prefills.append((ids.shape[0], 0 if pixels is None else pixels.shape[0]))


def _reference(model, processor, example: dict, p: SamplingParams) -> tuple[str, int, str]:
    """The answer given alone by the evaluation path (one `model.generate`)."""
    c = generate(model, processor, [example], p, images_loaded=True)[0]
    return c.text, c.completion_tokens, c.finish_reason


def _run(generation):
    generation.text()
    return generation


def _seen(processor, generation) -> tuple[str, int, str]:
    text = processor.tokenizer.decode(generation.ids, skip_special_tokens=True).strip()
    return text, generation.usage["completion_tokens"], generation.usage["finish_reason"]


def test_image_prefix_hits_change_no_answer(sharp):
    model, processor = sharp
    cached = Batcher(model, processor, max_batch=8)
    plain = Batcher(model, processor, max_batch=8, image_prefix_cache=0)
    assert cached.image_prefix_cache == 32 and plain.image_prefix_cache == 0
    p = SamplingParams(max_new_tokens=10)
    one = ask([1], "Question 0: What does this show?")
    first_answer = plain.submit(one, p).text()
    cases = {
        "first": one,
        "the same again": one,
        "another question": ask([1], "Question 1: Is it normal? Describe it."),
        # then together in one join:
        "image 2": ask([2], "Question 2: What does this show?"),
        "image 3, own system turn": ask([3], "Question 3: Why?", system="Case 7."),
        "image 1 again": ask([1], "Question 4: Describe it."),
        "images 2 and 3": ask([2, 3], "Question 5: Compare them."),
        "text only": ask([], "Question 6: What is a nodule?"),
        "second turn on image 1": ask(
            [1], "Question 7: And now?", turns=["Question 0: What does this show?", first_answer]
        ),
        # and after it, alone again:
        "images 2 and 3 again": ask([2, 3], "Question 8: Which is larger?"),
        "second turn, own system turn": ask(
            [3], "Question 9: Sure?", turns=["Question 3: Why?", "No."], system="Case 7."
        ),
    }
    names = list(cases)
    expected = {name: _reference(model, processor, example, p) for name, example in cases.items()}
    without = {name: _seen(processor, _run(plain.submit(example, p))) for name, example in cases.items()}
    assert without == expected
    assert plain.prefix_hits == 0 and not plain._image_prefixes
    # answers differ: a row using another's prefix would show
    assert len(set(expected.values())) >= len(cases) - 3

    forwards = _Forwards(model)
    got, hits = {}, []
    try:
        for name in names[:3]:
            got[name] = _seen(processor, _run(cached.submit(cases[name], p)))
            hits.append(cached.prefix_hits)
        assert hits == [0, 1, 2]  # the same image asked again, and about something else: hits
        forwards.hold.clear()
        forwards.entered.clear()
        busy = cached.submit(ask([9], "Question 10: Busy?"), SamplingParams(max_new_tokens=2))
        assert forwards.entered.wait(60)  # the model waits: the next six wait in line and join together
        joined = {name: cached.submit(cases[name], p) for name in names[3:9]}
        forwards.hold.set()
        busy.text()
        for name, generation in joined.items():
            got[name] = _seen(processor, _run(generation))
        assert cached.prefix_hits == 4  # image 1 again and the second turn about image 1
        for name in names[9:]:
            got[name] = _seen(processor, _run(cached.submit(cases[name], p)))
    finally:
        forwards.hold.set()
        forwards.handle.remove()
    assert got == expected
    assert cached.prefix_hits == 6
    # the join ran in one prefill; only the images not cached went through the vision tower (2, 3, 2 and 3)
    assert forwards.prefills[3:5] == [(1, 1), (6, 4)], forwards.prefills
    assert forwards.prefills[5:] == [(1, 0), (1, 0)]  # later hits run no image at all
    # one entry per image set (and system turn): 1; 9; 2; 3 with its system turn; 2 and 3
    assert len(cached._image_prefixes) == 5
    assert cached.running == 0


def test_seeded_sampling_gives_the_same_answer_on_an_image_prefix_hit(sharp):
    """A seeded sampled answer (the chat's Sampling settings) is the same whether its image prefix is computed
    (a miss), taken from the cache (a hit, no prefill of the image), or joined in one prefill with others."""
    model, processor = sharp
    cached = Batcher(model, processor, max_batch=4)
    plain = Batcher(model, processor, max_batch=4, image_prefix_cache=0)
    cases = [
        (ask([5, 6], "Has the lesion grown?"), SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)),
        (
            ask([5, 6], "And now?", turns=["Has the lesion grown?", "Maybe."]),
            SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11),
        ),
    ]
    expected = [_run(plain.submit(example, p)).ids for example, p in cases]
    assert expected[0] != expected[1]
    assert [_run(cached.submit(example, p)).ids for example, p in cases] == expected  # a miss, then a hit
    assert cached.prefix_hits == 1
    forwards = _Forwards(model)
    try:
        forwards.hold.clear()
        forwards.entered.clear()
        busy = cached.submit(ask([9], "Busy?"), SamplingParams(max_new_tokens=2, temperature=1.0, seed=1))
        assert forwards.entered.wait(60)  # the model waits: the next three join in one prefill
        other = cached.submit(ask([1], "Other?"), SamplingParams(max_new_tokens=12, temperature=1.0, seed=7))
        joined = [cached.submit(example, p) for example, p in reversed(cases)]
        forwards.hold.set()
        busy.text()
        other.text()
        assert [_run(generation).ids for generation in reversed(joined)] == expected
    finally:
        forwards.hold.set()
        forwards.handle.remove()
    assert cached.prefix_hits == 3 and forwards.prefills[1] == (3, 1)


def test_image_prefix_cache_keeps_the_most_recently_used(sharp):
    from transformers import DynamicCache

    model, processor = sharp
    batcher = Batcher(model, processor, image_prefix_cache=2)
    p = SamplingParams(max_new_tokens=2)
    seeds: dict[tuple, int] = {}  # image-prefix key -> the seed of its image
    questions = itertools.count()

    def question(seed: int) -> None:
        example = ask([seed], f"Question {next(questions)}: What is it?")
        seeds[batcher.encode(example).key] = seed
        _run(batcher.submit(example, p))

    def kept() -> list[int]:
        return [seeds[key] for key in batcher._image_prefixes]  # least recently used first

    for seed in (1, 2, 3):
        question(seed)
    assert kept() == [2, 3] and batcher.prefix_hits == 0  # the first image was evicted
    question(1)  # asked again: a miss, kept again
    assert kept() == [3, 1] and batcher.prefix_hits == 0
    question(3)  # a hit: now the most recently used
    assert batcher.prefix_hits == 1 and kept() == [1, 3]
    question(4)  # evicts image 1, the least recently used
    assert kept() == [3, 4] and len(seeds) == 4

    # an entry holds exactly the prefix's keys and values, as the prefix run alone gives them
    prompt = batcher.encode(ask([4], "Question 9: Anything?"))
    assert seeds[prompt.key] == 4
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.model(
            input_ids=prompt.ids[None, : prompt.floor], pixel_values=prompt.pixels, past_key_values=cache
        )
    entry = batcher._image_prefixes[prompt.key]
    assert len(entry) == len(cache.layers)
    for (keys, values), layer in zip(entry, cache.layers, strict=True):
        assert keys.shape == layer.keys.shape and keys.shape[:3] == (1, layer.keys.shape[1], prompt.floor)
        torch.testing.assert_close(keys, layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, layer.values, rtol=1e-5, atol=1e-5)


def test_image_prefix_cache_is_off_in_bf16_by_default():
    model, processor = tiny_model()
    model = model.to(torch.bfloat16)
    batcher = Batcher(model, processor)
    assert batcher.image_prefix_cache == 0 and batcher.prefix_ids == []
    example = ask([1], "Question 0: What is it?")
    assert batcher.encode(example).key is None
    on = Batcher(model, processor, image_prefix_cache=4)  # asked for: on
    assert on.image_prefix_cache == 4 and on.encode(example).key is not None
    with pytest.raises(ValueError, match="image_prefix_cache must be >= 0"):
        Batcher(model, processor, image_prefix_cache=-1)


def test_serve_flag_sets_the_image_prefix_cache(tiny):
    from serve.__main__ import parse_args

    assert parse_args([]).image_prefix_cache is None
    assert parse_args(["--image-prefix-cache", "0"]).image_prefix_cache == 0
    with pytest.raises(SystemExit):
        parse_args(["--image-prefix-cache", "-1"])
    assert Engine(*tiny).batcher.image_prefix_cache == 32
    assert Engine(*tiny, image_prefix_cache=0).batcher.image_prefix_cache == 0
