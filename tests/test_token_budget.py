"""The image-token budget: rows with many images get fewer tokens per image, pooled on the patch grid."""

import pytest
import torch
from conftest import random_image, tiny_model

from medllava.generation import generate
from medllava.processing import AssistantOnlyCollator, count_tokens, encode, image_token_count
from medllava.schema import message
from medllava.token_budget import (
    DEFAULT_BUDGET,
    TokenBudgetError,
    enable_pooling,
    image_runs,
    pool_tokens,
    pooled_side,
    shrink_rows,
)

# 56 px with 14 px patches: 4 x 4 = 16 tokens an image; a budget of 40 holds 2 images whole, 3 at 3 x 3 = 9 each
SIZE, BUDGET = 56, 40


def _row(n_images, text="Compare the images.", seed=0, answer=None):
    messages = [message("user", text, n_images)]
    if answer is not None:
        messages.append(message("assistant", answer))
    return {"images": [random_image(seed + i) for i in range(n_images)], "messages": messages}


@pytest.fixture(scope="module")
def budgeted():
    model, processor = tiny_model(image_size=SIZE)
    enable_pooling(model)
    processor.image_token_budget = BUDGET
    return model.eval(), processor


def test_the_rule_keeps_rows_within_the_budget_whole_and_shrinks_the_others():
    assert pooled_side(1, 12) == pooled_side(8, 12) == 12  # 8 x 144 = DEFAULT_BUDGET at 168 px
    assert DEFAULT_BUDGET == 8 * 144
    assert pooled_side(9, 12) == 11 and pooled_side(24, 12) == 6 and pooled_side(64, 12) == 4
    for n in range(1, 129):
        side = pooled_side(n, 12)
        assert n * side * side <= DEFAULT_BUDGET or side == 12
        assert side == 12 or n * (side + 1) ** 2 > DEFAULT_BUDGET  # the largest grid that fits
    with pytest.raises(TokenBudgetError, match="at most 128"):
        pooled_side(129, 12)


def test_pool_tokens_averages_patch_neighbourhoods():
    grid = torch.arange(16.0).reshape(4, 4)
    features = torch.stack([grid.flatten(), -grid.flatten()], dim=1)  # (16, 2), row-major patches
    pooled = pool_tokens(features, 2)
    assert pooled[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pooled[:, 1], -pooled[:, 0])
    assert pool_tokens(features, 4) is features


def test_shrink_rows_and_image_runs_round_trip():
    img, pad = 7, 0
    # row 0: two images of 4 tokens (side 2 kept whole); row 1: two images cut to 1 token each
    ids = torch.tensor([[5, 7, 7, 7, 7, 9, 7, 7, 7, 7, 9, 6]] * 2)
    mask = torch.ones_like(ids)
    new_ids, new_mask = shrink_rows(ids, mask, img, 4, [4, 1], pad, "left")
    assert new_ids[0].tolist() == ids[0].tolist()
    assert new_ids[1].tolist() == [pad] * 6 + [5, 7, 9, 7, 9, 6] and new_mask[1].tolist() == [0] * 6 + [1] * 6
    assert image_runs(new_ids, img, 4) == [4, 4, 1, 1]
    # two whole images with no text between them are still two images; an odd run is refused
    assert image_runs(torch.tensor([[5] + [7] * 8 + [6]]), img, 4) == [4, 4]
    with pytest.raises(ValueError, match="separated by text"):
        image_runs(torch.tensor([[5] + [7] * 6 + [6]]), img, 4)


def test_encode_pools_only_rows_over_the_budget(budgeted):
    model, processor = budgeted
    full = image_token_count(processor)
    assert full == 16
    batch = encode(processor, [_row(2), _row(3, seed=5)])
    image = model.config.image_token_id
    per_row = (batch["input_ids"] == image).sum(1).tolist()
    assert per_row == [2 * 16, 3 * 9]
    assert image_runs(batch["input_ids"], image, full) == [16, 16, 9, 9, 9]
    # count_tokens (used to drop long rows) agrees with what encode produces for a training row
    whole = encode(processor, [_row(2), _row(3, seed=5)], add_generation_prompt=False)
    for row, n in zip((_row(2), _row(3, seed=5)), whole["attention_mask"].sum(1).tolist(), strict=True):
        assert count_tokens(processor, {"messages": row["messages"]}) == n


def test_pooled_rows_feed_the_llm_the_pooled_projected_tokens(budgeted):
    model, processor = budgeted
    row = _row(3, seed=2)
    batch = encode(processor, [row])
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    with torch.no_grad():
        unpooled = model.model.multi_modal_projector(
            model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer
            ][:, 1:]
        )
    expected = torch.cat([pool_tokens(f, 3) for f in unpooled])
    placed = seen["embeds"][0][batch["input_ids"][0] == model.config.image_token_id]
    assert torch.allclose(placed, expected, atol=1e-5)


def test_rows_within_the_budget_are_unchanged_by_pooling(budgeted):
    model, processor = budgeted
    plain, _ = tiny_model(image_size=SIZE)
    batch = encode(processor, [_row(2, seed=4)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain.eval()(**batch).logits)


def test_mixed_batches_generate_and_train_with_pooled_rows(budgeted):
    model, processor = budgeted
    rows = [_row(1, seed=1), _row(4, seed=7)]
    answers = generate(model, processor, rows, max_new_tokens=3, images_loaded=True)
    alone = generate(model, processor, rows[1:], max_new_tokens=3, images_loaded=True)
    assert len(answers) == 2 and answers[1].text == alone[0].text
    collator = AssistantOnlyCollator(processor, max_length=512)
    batch = collator([_row(1, answer="yes"), _row(4, seed=3, answer="two lesions")])
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_too_many_images_for_the_budget_are_refused(budgeted):
    _, processor = budgeted
    # 40 // 9 = 4 images at the 3 x 3 floor; a fifth cannot fit
    with pytest.raises(TokenBudgetError, match="send fewer images"):
        encode(processor, [_row(5)])


def test_generate_pools_images_it_encodes_before_the_prefill(budgeted):
    # transformers' generate() encodes the pixels before the prefill and passes the features on: the pooled path
    # must give the same next token as a plain forward on the same pooled row
    model, processor = budgeted
    batch = encode(processor, [_row(3, seed=11)])
    with torch.no_grad():
        expected = model(**batch).logits[0, -1].argmax()
        out = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert out[0, -1] == expected


def test_the_serving_batcher_answers_pooled_rows_as_generate_does(budgeted):
    from concurrent.futures import ThreadPoolExecutor

    from medllava.batching import Batcher
    from medllava.generation import SamplingParams

    model, processor = budgeted
    rows = [_row(4, seed=21), _row(1, seed=25), _row(3, seed=27)]
    params = SamplingParams(max_new_tokens=5)
    batcher = Batcher(model, processor, max_batch=4)

    def answer(row):
        generation = batcher.submit(row, params)
        "".join(generation)
        return processor.tokenizer.decode(generation.ids, skip_special_tokens=True).strip()

    with ThreadPoolExecutor(len(rows)) as pool:
        together = list(pool.map(answer, rows))
    for row, text in zip(rows, together, strict=True):
        assert text == generate(model, processor, [row], params, images_loaded=True)[0].text
