"""Dynamic batching (`medllava.batching`): answers under load equal answers given alone; and the vLLM path.

The tiny random model of conftest answers every prompt with the same newline token, which would make equality
trivial; here its language model's weight matrices are scaled up so its greedy answers differ from prompt to
prompt and a row that saw another row's tokens, positions or padding would answer differently.
"""

from __future__ import annotations

import json
import threading
import time
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
