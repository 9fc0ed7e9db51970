"""Assembly, save/reload with plain transformers, image-token accounting, stage freezing."""

import pytest
import torch
from conftest import random_image, tiny_model

from medllava.modeling import STAGES, freeze_for_stage, model_parts
from medllava.processing import encode, image_token_count
from medllava.schema import message


def _example(text="What is shown?", n_images=1, seed=0):
    return {
        "images": [random_image(seed + i) for i in range(n_images)],
        "messages": [message("user", text, n_images)],
    }


def test_assembly_adds_tokens_and_mean_initialises_them(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_id
    assert tok.pad_token_id not in (tok.eos_token_id, image_id)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    old = emb[:image_id]
    # New rows come from the old rows' distribution: close to their mean, far from zero or a random outlier.
    assert (emb[image_id] - old.mean(0)).norm() < 3 * (old - old.mean(0)).norm(dim=1).mean()
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied, as in SmolLM2


def test_chat_template_renders_images_and_medical_system_prompt(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(
        [message("user", "Is there a lesion?", 1)], tokenize=False, add_generation_prompt=True
    )
    assert "MedLLaVA" in text and "SmolLM" not in text and "not for clinical use" in text
    assert "<|im_start|>user\n<image>\nIs there a lesion?<|im_end|>\n<|im_start|>assistant\n" in text
    custom = processor.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, message("user", "Hi", 0)], tokenize=False
    )
    assert custom.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "MedLLaVA" not in custom


@pytest.mark.parametrize("image_size", [28, 42, 56])
def test_image_token_count_matches_vision_features(image_size):
    model, processor = tiny_model(image_size=image_size)
    batch = encode(processor, [_example(n_images=2)])
    n_tokens = int((batch["input_ids"] == model.config.image_token_index).sum())
    assert n_tokens == 2 * image_token_count(processor) == 2 * (image_size // 14) ** 2
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"])
    features = torch.cat(list(features.pooler_output if hasattr(features, "pooler_output") else features))
    assert features.reshape(-1, features.shape[-1]).shape[0] == n_tokens
    with torch.no_grad():
        model(**batch)  # would raise "Image features and image tokens do not match" on a mismatch


def test_save_then_plain_transformers_reload_gives_identical_logits(tiny, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reproc = AutoProcessor.from_pretrained(tmp_path)
    example = _example()
    a, b = encode(processor, [example]), encode(reproc, [example])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**a).logits, reloaded(**b).logits)


def test_kv_cache_matches_no_cache(tiny):
    model, processor = tiny
    batch = encode(processor, [_example()])
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
        full = model(input_ids=cached, pixel_values=batch["pixel_values"]).logits
    assert torch.equal(cached, uncached)
    # and the cached step logits agree with one full forward pass over the same sequence
    prompt = batch["input_ids"].shape[1]
    assert torch.equal(full[0, prompt - 1 : -1].argmax(-1), cached[0, prompt:])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_freeze_for_stage_sets_exactly_the_stage_parts(stage):
    model, _ = tiny_model()
    counts = freeze_for_stage(model, stage)
    parts = model_parts(model)
    for name, modules in parts.items():
        flags = {p.requires_grad for m in modules for p in m.parameters()}
        assert flags == {name in STAGES[stage]}, (stage, name, flags)
        assert (counts[name] > 0) == (name in STAGES[stage])
    freeze_for_stage(model, stage, train_vision=True)
    assert all(p.requires_grad for p in parts["vision"][0].parameters())


def test_unknown_stage_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="unknown stage 'pretrain'"):
        freeze_for_stage(tiny[0], "pretrain")


def test_delta_round_trip_stores_low_rank_changes_compactly(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from medllava.modeling import apply_delta, save_delta

    base, processor = tiny_model()
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    trained, _ = tiny_model()
    with torch.no_grad():
        q = trained.model.language_model.layers[0].self_attn.q_proj.weight
        q += torch.randn(q.shape[0], 2) @ torch.randn(2, q.shape[1])  # a rank-2 change, like a merged LoRA
        trained.model.multi_modal_projector.linear_1.weight.mul_(1.5)  # a full-rank change
    sizes = save_delta(base, trained, tmp_path / "delta")
    q_name = next(k for k in sizes if "layers.0.self_attn.q_proj.weight" in k)
    assert sizes[q_name] == 2 * (q.shape[0] + q.shape[1])  # stored as two rank-2 factors
    assert any("multi_modal_projector.linear_1.weight" in k for k in sizes)
    assert len(sizes) == 2
    apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    rebuilt = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    for name, value in trained.state_dict().items():
        assert torch.allclose(rebuilt.state_dict()[name], value, atol=1e-5), name
