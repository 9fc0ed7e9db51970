"""Assemble a transformers `LlavaForConditionalGeneration` from a pretrained vision tower and a pretrained LLM.

No model code of our own: the result is plain HF Llava, so `from_pretrained`, `generate`, TRL, PEFT and vLLM work
unchanged. This module only wires parts together, adds the image and pad tokens, and decides which parameters
train in each curriculum stage.

    from medllava.modeling import build_model
    model, processor = build_model(vision="default", llm="default")                      # packaged weights
    model, processor = build_model(vision="microsoft/rad-dino", llm="lmsys/vicuna-7b-v1.5")  # hub ids / dirs
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()

# Which parts train in each curriculum stage (LLaVA-Med: stage 1 projector only, later stages projector + LLM).
STAGES: dict[str, tuple[str, ...]] = {
    "align": ("projector",),
    "instruct": ("projector", "llm"),
    "specialist": ("projector", "llm"),
    "preference": ("projector", "llm"),
}
# LoRA on the LLM's linear layers only; `all-linear` would also wrap the vision tower and the projector.
LLM_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_MODULE = "multi_modal_projector"


def model_parts(model) -> dict[str, list[nn.Module]]:
    """The three parts of a Llava model (unwrapping a PEFT model if needed)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = model.model
    return {
        "vision": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "llm": [inner.language_model, model.lm_head],
    }


def freeze_for_stage(model, stage: str, train_vision: bool = False) -> dict[str, int]:
    """Set `requires_grad` for a curriculum stage; return the number of trainable parameters per part."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; choose one of {sorted(STAGES)}")
    trainable = set(STAGES[stage]) | ({"vision"} if train_vision else set())
    parts = model_parts(model)
    model.requires_grad_(False)
    for name in trainable:
        for module in parts[name]:
            module.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model) -> dict[str, int]:
    """Trainable parameters per part (vision/projector/llm, plus LoRA); ZeRO-3-partitioned tensors counted in full."""
    counts = {}
    for name, modules in model_parts(model).items():
        # lm_head may be tied to the embeddings: count each tensor once
        seen = {id(p): p for m in modules for p in m.parameters()}
        counts[name] = sum(getattr(p, "ds_numel", p.numel()) for p in seen.values() if p.requires_grad)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Loading the parts
# ---------------------------------------------------------------------------------------------------------------


def _is_gguf(spec: str) -> bool:
    return str(spec).lower().endswith(".gguf")


def load_llm(spec, tokenizer=None, dtype=torch.float32):
    """An LLM and tokenizer from "default" (packaged SmolLM2), a .gguf file, a local dir or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("an in-memory LLM needs its tokenizer passed as `tokenizer=`")
        return spec, tokenizer
    if spec in (None, "default"):
        from medllava.assets import llm_dir

        spec = str(llm_dir())
    if _is_gguf(spec):
        from medllava.assets import load_gguf_llm

        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        model, tok = load_gguf_llm(spec)
        return model.to(dtype), tokenizer or tok
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model, tokenizer or AutoTokenizer.from_pretrained(spec)


def load_vision(spec, dtype=torch.float32):
    """A vision encoder and its image processor (None if it ships none) from "default", a dir or a hub id.

    CLIP and SigLIP checkpoints may be full dual-encoder models: only their vision half is loaded.
    """
    from transformers import AutoConfig, AutoImageProcessor, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if isinstance(spec, PreTrainedModel):
        return spec, None
    if spec in (None, "default"):
        from medllava.assets import vision_dir

        spec = str(vision_dir())
    config = AutoConfig.from_pretrained(spec)
    config = getattr(config, "vision_config", None) or config
    model_cls = MODEL_MAPPING[type(config)]
    model = model_cls.from_pretrained(spec, config=config, dtype=dtype)
    try:
        image_processor = AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError):
        image_processor = None
    return model, image_processor


def _has_cls_token(vision_config) -> bool:
    # SigLIP pools without a CLS token; CLIP, DINOv2 and ViT prepend one.
    return "siglip" not in vision_config.model_type


def _interpolates_positions(vision_config) -> bool:
    # DINOv2 interpolates its position embeddings to any input size; CLIP/SigLIP in Llava use their trained size.
    return vision_config.model_type in ("dinov2", "dinov2_with_registers")


def make_image_processor(image_size: int, base=None):
    """Resize the whole image to a square (no centre crop: a crop can cut a finding at the border)."""
    from transformers import BitImageProcessorPil

    mean = list(getattr(base, "image_mean", None) or IMAGENET_MEAN)
    std = list(getattr(base, "image_std", None) or IMAGENET_STD)
    return BitImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_resize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
        resample=3,
    )


def build_model(
    vision="default",
    llm="default",
    image_size: int | None = None,
    tokenizer=None,
    vision_feature_layer: int = -2,
    dtype=torch.float32,
    seed: int | None = 0,
):
    """Assemble (model, processor). `image_size` applies to towers that interpolate positions (DINOv2)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from medllava.assets import DEFAULT_IMAGE_SIZE

    vision_model, vision_processor = load_vision(vision, dtype=dtype)
    llm_model, tokenizer = load_llm(llm, tokenizer=tokenizer, dtype=dtype)
    vcfg, tcfg = vision_model.config, llm_model.config

    if _interpolates_positions(vcfg):
        image_size = image_size or DEFAULT_IMAGE_SIZE
    else:
        if image_size not in (None, vcfg.image_size):
            raise ValueError(
                f"{vcfg.model_type} works at its trained size {vcfg.image_size}, not {image_size}"
            )
        image_size = vcfg.image_size
    if image_size % vcfg.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {vcfg.patch_size}")
    n_extra = 1 if _has_cls_token(vcfg) else 0
    num_image_tokens = (image_size // vcfg.patch_size) ** 2

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # A distinct pad token: with pad == eos, anything that masks by pad id also hides every real end of turn.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # generation; the training collator pads right itself
    if seed is not None:
        torch.manual_seed(seed)  # new token rows and the projector are the only freshly initialised parts
    llm_model.resize_token_embeddings(
        len(tokenizer), mean_resizing=True
    )  # new rows ~ the old rows' distribution
    tcfg = llm_model.config

    config = LlavaConfig(
        vision_config=vcfg.to_dict() | {"model_type": vcfg.model_type},
        text_config=tcfg.to_dict() | {"model_type": tcfg.model_type},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if n_extra else "full",
        vision_feature_layer=vision_feature_layer,
        image_seq_length=num_image_tokens,
        tie_word_embeddings=getattr(tcfg, "tie_word_embeddings", False),
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.model.vision_tower.load_state_dict(vision_model.state_dict())
    model.model.language_model.load_state_dict(llm_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm_model.get_output_embeddings().state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if ("<|im_end|>" in tokenizer.get_vocab())
        else tokenizer.eos_token_id
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    for attr in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, attr, None)
    model.eval()

    processor = LlavaProcessor(
        image_processor=make_image_processor(image_size, vision_processor),
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=n_extra,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------------------------
# Deltas: a trained model shipped as only the tensors that differ from its base
# ---------------------------------------------------------------------------------------------------------------


def _low_rank(diff: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) with A @ B == diff up to rtol of its largest singular value, if that is smaller than diff itself."""
    u, sv, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    rank = int((sv > rtol * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    if rank * sum(diff.shape) >= diff.numel() // 2:
        return None
    return (u[:, :rank] * sv[:rank]).float().contiguous(), vh[:rank].float().contiguous()


def save_delta(
    base_model,
    trained_model,
    out_dir: str | Path,
    rtol: float = 1e-4,
    factor_dtype: torch.dtype = torch.float32,
) -> dict[str, int]:
    """Write what `trained_model` changed relative to `base_model` to out_dir/delta.safetensors.

    Changed matrices whose change has low rank (LoRA merges: the sum of each stage's B @ A) are stored as two
    factors `<name>::A`, `<name>::B` (in `factor_dtype`: float16 halves the size at ~1e-3 relative error of the
    change); other changed tensors (the projector) in full. Returns {tensor: stored numel}.
    """
    from safetensors.torch import save_file

    base = base_model.state_dict()
    delta, sizes = {}, {}
    for name, value in trained_model.state_dict().items():
        value = value.detach().float()
        if name in base and value.shape == base[name].shape:
            diff = value - base[name].float()
            if not diff.any():
                continue
            factors = _low_rank(diff, rtol) if diff.ndim == 2 else None
            if factors is not None:
                delta[f"{name}::A"], delta[f"{name}::B"] = (f.to(factor_dtype) for f in factors)
                sizes[name] = factors[0].numel() + factors[1].numel()
                continue
        delta[name] = value.contiguous().clone()
        sizes[name] = value.numel()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(delta, str(out_dir / "delta.safetensors"), metadata={"format": "medllava-delta-v1"})
    return sizes


def apply_delta(base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path) -> None:
    """Base checkpoint + delta -> a full plain-HF Llava checkpoint in out_dir."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    delta = load_file(str(Path(delta_dir) / "delta.safetensors"))
    state = model.state_dict()
    full = {}
    for key, value in delta.items():
        name, _, part = key.partition("::")
        if name not in state:
            raise KeyError(f"delta tensor '{name}' does not exist in the base model at {base_dir}")
        if part == "A":
            full[name] = state[name] + delta[f"{name}::A"].float() @ delta[f"{name}::B"].float()
        elif not part:
            full[name] = value
    model.load_state_dict(full, strict=False)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(base_dir).save_pretrained(out_dir)
