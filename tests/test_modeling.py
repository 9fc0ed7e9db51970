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


# --- the vision tower as a trainable part -----------------------------------------------------------------------

# The linear layers vision LoRA adapts in one block of each tower kind (transformers 5.23 module names).
TOWER_LINEARS = {
    "dinov2": [
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
    ],
    "clip": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ],
    "siglip": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ],
}
TOWER_BLOCKS = {
    "dinov2": "model.vision_tower.encoder.layer",
    "clip": "model.vision_tower.encoder.layers",
    "siglip": "model.vision_tower.encoder.layers",
}


def tower_model(kind: str, layers: int = 4):
    """A tiny Llava around a random 4-block DINOv2, CLIP or SigLIP tower (28 px, patch 14)."""
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medllava.assets import llm_dir
    from medllava.modeling import build_model

    torch.manual_seed(0)
    common = dict(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, patch_size=14, image_size=28
    )
    vision = {
        "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common)),
        "clip": lambda: transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(intermediate_size=64, **common)
        ),
        "siglip": lambda: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(intermediate_size=64, **common)
        ),
    }[kind]()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir())
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    return build_model(vision=vision, llm=llm, tokenizer=tokenizer, image_size=28)


def _block_params(model, kind: str, indices) -> set[str]:
    prefixes = tuple(f"{TOWER_BLOCKS[kind]}.{i}." for i in indices)
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("kind", sorted(TOWER_BLOCKS))
def test_last_vision_blocks_train_and_all_of_them_feed_the_features(kind):
    from medllava.modeling import VisionTraining, vision_blocks

    model, processor = tower_model(kind)
    # vision_feature_layer -2 of 4 blocks: the features are block 2's output; block 3 never reaches the LLM
    path, blocks = vision_blocks(model)
    assert path == TOWER_BLOCKS[kind] and len(blocks) == 3
    counts = freeze_for_stage(model, "align", vision=VisionTraining(2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in trainable if ".vision_tower." in n}
    assert tower == _block_params(model, kind, (1, 2)), sorted(tower)
    assert trainable - tower == {n for n, _ in model.named_parameters() if "multi_modal_projector" in n}
    assert counts["vision"] == sum(p.numel() for n, p in model.named_parameters() if n in tower) > 0
    model.train()
    model(**encode(processor, [_example()])).logits.sum().backward()
    no_grad = sorted(
        n for n, p in model.named_parameters() if n in tower and (p.grad is None or not p.grad.any())
    )
    assert not no_grad, no_grad
    # the whole tower (train_vision): block 3 and the final layernorm are outside Llava's forward pass
    model.zero_grad(set_to_none=True)
    freeze_for_stage(model, "align", train_vision=True)
    model(**encode(processor, [_example()])).logits.sum().backward()
    unused = {n for n, p in model.named_parameters() if ".vision_tower." in n and p.grad is None}
    assert _block_params(model, kind, (3,)) <= unused and any("layernorm" in n for n in unused), sorted(
        unused
    )


@pytest.mark.parametrize("kind", sorted(TOWER_BLOCKS))
def test_vision_lora_targets_exactly_the_linear_layers_of_the_chosen_blocks(kind):
    from peft import LoraConfig, get_peft_model

    from medllava.modeling import LLM_LORA_TARGET_MODULES, vision_lora_target

    model, _ = tower_model(kind)
    target = vision_lora_target(model, 2)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=f"(?:{LLM_LORA_TARGET_MODULES})|(?:{target})")
    )
    adapted = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    tower = {n for n in adapted if ".vision_tower." in n}
    assert tower == {f"{TOWER_BLOCKS[kind]}.{i}.{layer}" for i in (1, 2) for layer in TOWER_LINEARS[kind]}
    assert adapted - tower and all(".language_model." in n for n in adapted - tower)
    # -1: every block that feeds the features
    assert vision_lora_target(model, -1) == target.replace("(?:1|2)", "(?:0|1|2)")


def test_vision_training_is_validated(tiny):
    from medllava.modeling import STAGES, Stage, VisionTraining, vision_train_modules

    model, _ = tiny
    # the tiny tower has 2 blocks; vision_feature_layer -2: only block 0 feeds the features
    with pytest.raises(ValueError, match="only 1 of the tower's 2 blocks feed the features"):
        vision_train_modules(model, 2)
    with pytest.raises(ValueError, match="-1 \\(all\\), 0 \\(frozen\\)"):
        VisionTraining(-2)
    with pytest.raises(ValueError, match="mode must be one of"):
        VisionTraining(1, "partial")
    with pytest.raises(ValueError, match="LoRA on the vision tower goes through PEFT"):
        freeze_for_stage(tiny_model()[0], "align", vision=VisionTraining(1, "lora"))
    with pytest.raises(ValueError, match="train_vision .* contradicts"):
        freeze_for_stage(tiny_model()[0], "align", train_vision=True, vision=VisionTraining(1))
    assert all(not stage.vision.trains for stage in STAGES.values())  # today's defaults: the tower frozen
    assert "vision" in Stage(("projector",), VisionTraining(1)) and "llm" not in Stage(("projector",))
    assert vision_train_modules(model, -1) == ["model.vision_tower"] and vision_train_modules(model, 0) == []


def test_set_image_size_changes_the_image_token_count_and_is_saved(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medllava.modeling import image_size_of, set_image_size

    model, processor = tiny_model(image_size=28)
    assert image_token_count(processor) == 4 and image_size_of(model) == 28
    assert set_image_size(model, processor, 42) == 9
    batch = encode(processor, [_example()])
    assert (
        int((batch["input_ids"] == model.config.image_token_index).sum()) == image_token_count(processor) == 9
    )
    assert batch["pixel_values"].shape[-2:] == (42, 42)
    with torch.no_grad():
        model(**batch)  # DINOv2 interpolates its position embeddings: 9 features for 9 tokens
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert image_token_count(AutoProcessor.from_pretrained(tmp_path)) == 9 and image_size_of(reloaded) == 42
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 14"):
        set_image_size(model, processor, 50)
    clip, clip_processor = tower_model("clip")
    with pytest.raises(ValueError, match="clip_vision_model works at its trained size 28, not 42"):
        set_image_size(clip, clip_processor, 42)


def test_delta_carries_the_towers_change_and_image_size(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medllava.modeling import apply_delta, save_delta, set_image_size

    base, processor = tiny_model(vision_layers=3)
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    trained, trained_processor = tiny_model(vision_layers=3)
    blocks = trained.model.vision_tower.encoder.layer
    with torch.no_grad():
        blocks[1].mlp.fc1.weight.add_(0.1 * torch.randn_like(blocks[1].mlp.fc1.weight))  # a block in full
        blocks[1].norm1.bias.add_(0.05)
        q = blocks[0].attention.q_proj.weight
        q += torch.randn(q.shape[0], 2) @ torch.randn(2, q.shape[1]) * 0.1  # a merged tower LoRA: rank 2
    set_image_size(trained, trained_processor, 42)
    sizes = save_delta(base, trained, tmp_path / "delta")
    assert set(sizes) == {
        "model.vision_tower.encoder.layer.1.mlp.fc1.weight",
        "model.vision_tower.encoder.layer.1.norm1.bias",
        "model.vision_tower.encoder.layer.0.attention.q_proj.weight",
    }
    assert sizes["model.vision_tower.encoder.layer.0.attention.q_proj.weight"] == 2 * (
        q.shape[0] + q.shape[1]
    )
    apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    rebuilt = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert image_token_count(AutoProcessor.from_pretrained(tmp_path / "out")) == 9
