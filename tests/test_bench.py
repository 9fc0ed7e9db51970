"""bench: the work counts behind the benchmarks' "of GEMM limit" columns."""

import json
from pathlib import Path
from types import SimpleNamespace

from conftest import random_image

from bench.eval_throughput import data_sets, flops, linear_params
from medllava.generation import load
from medllava.schema import make_vqa_row


def test_eval_flops_count_the_matrix_products_that_run(tiny_model_dir):
    model, processor = load(str(tiny_model_dir))
    lm = model.model.language_model
    embeddings = lm.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in lm.named_parameters() if "norm" in n)
    assert linear_params(lm) == sum(p.numel() for p in lm.parameters()) - embeddings - norms > 0
    one = [SimpleNamespace(prompt_tokens=10, completion_tokens=3)]
    base = flops(model, processor, one)
    # the tower runs at the processor's grid, whatever image_size its config was converted with
    model.config.vision_config.image_size = 518
    assert flops(model, processor, one) == base
    # one more prompt token: the LLM layers only (the LM head scores generated tokens only)
    more_prompt = flops(model, processor, [SimpleNamespace(prompt_tokens=11, completion_tokens=3)])
    assert more_prompt - base == 2 * linear_params(lm)
    more_generated = flops(model, processor, [SimpleNamespace(prompt_tokens=10, completion_tokens=4)])
    assert more_generated - base == 2 * (linear_params(lm) + model.lm_head.weight.numel())
    # each image's patches at the processor's resolution
    side = processor.image_processor.size["height"] // processor.patch_size
    processor.image_processor.size = {
        "height": 2 * side * processor.patch_size,
        "width": 2 * side * processor.patch_size,
    }
    grown = flops(model, processor, one) - base
    assert grown == 2 * linear_params(model.model.vision_tower) * 3 * side * side


def test_shared_prefix_flops_count_each_prefix_and_image_once(tiny_model_dir):
    model, processor = load(str(tiny_model_dir))
    plain = flops(model, processor, [SimpleNamespace(prompt_tokens=10, completion_tokens=3)] * 2)
    two = [SimpleNamespace(prompt_tokens=10, completion_tokens=3, cached_tokens=7)] * 2
    shared = flops(model, processor, two, {"prefix_tokens": 7, "prefix_images": 1})
    side = processor.image_processor.size["height"] // processor.patch_size
    patches = side * side + processor.num_additional_image_tokens
    layers, vision = linear_params(model.model.language_model), linear_params(model.model.vision_tower)
    # the second question's 7 prefix tokens and its image did not run again
    assert plain - shared == 2 * (7 * layers + vision * patches)


def test_bench_question_sets_take_whole_images_and_n_questions_per_image(tmp_path):
    (tmp_path / "images").mkdir()
    with (tmp_path / "vqa.jsonl").open("w") as f:
        for i in range(12):
            image = f"images/im{i % 4}.png"
            random_image(i % 4).save(tmp_path / image)
            row = make_vqa_row(f"q{i}", [image], f"Question {i}?", "yes" if (i // 4) % 2 else "liver")
            f.write(json.dumps(row) + "\n")
    grouped, many = data_sets(tmp_path / "vqa.jsonl", n_questions=5, n_images=2, per_image=5).values()
    # whole images (3 questions each), drawn at random, until 5 questions are taken
    images = [e["image_key"] for e in grouped]
    assert len(grouped) == 6 and len(set(images)) == 2
    assert all(images.count(image) == 3 for image in images)
    assert {e["answer_type"] for e in grouped} == {"OPEN", "CLOSED"}
    assert [Path(e["image_key"]).name for e in many] == ["im0.png"] * 5 + ["im1.png"] * 5
    assert many[0]["images"][0] is many[4]["images"][0]  # each picture loaded once
    for image in (many[:5], many[5:]):
        assert len({e["question"] for e in image}) == 5
    assert [e["question"] for e in many[:3]] == ["Question 0?", "Question 4?", "Question 8?"]  # its own first
