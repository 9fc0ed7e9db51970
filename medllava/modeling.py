"""Assemble a transformers `LlavaForConditionalGeneration` from a pretrained vision tower and a pretrained LLM.

No model code of our own: the result is plain HF Llava, so `from_pretrained`, `generate`, TRL, PEFT and vLLM work
unchanged. This module only wires parts together, adds the image and pad tokens, and decides which parameters
train in each curriculum stage.

    from medllava.modeling import build_model
    model, processor = build_model(vision="default", llm="default")                      # packaged weights
    model, processor = build_model(vision="microsoft/rad-dino", llm="lmsys/vicuna-7b-v1.5")  # hub ids / dirs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()

# LoRA on the LLM's linear layers only; `all-linear` would also wrap the vision tower and the projector.
LLM_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_MODULE = "multi_modal_projector"
VISION_MODULE = "vision_tower"
# The linear layers of a tower block that vision LoRA adapts: attention (DINOv2: q/k/v/o_proj; CLIP, SigLIP:
# q/k/v_proj, out_proj) and MLP (fc1, fc2), as named in transformers 5.23.
VISION_LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2")
VISION_MODES = ("full", "lora")


@dataclass(frozen=True)
class VisionTraining:
    """How much of the vision tower trains: its last `blocks` transformer blocks among those that feed the
    features Llava reads (`vision_feature_layer`), in full or by LoRA on their linear layers.

    blocks 0: the tower is frozen. blocks -1: in full, the whole tower (embeddings and every block, as
    `train_vision: true`); with LoRA, every block that feeds the features. Blocks after the feature layer and
    the tower's final layernorm are not in Llava's forward pass: they get no gradient and never change.
    """

    blocks: int = 0
    mode: str = "full"

    def __post_init__(self):
        if self.blocks < -1:
            raise ValueError(f"vision blocks must be -1 (all), 0 (frozen) or a count > 0, got {self.blocks}")
        if self.mode not in VISION_MODES:
            raise ValueError(f"vision training mode must be one of {VISION_MODES}, got {self.mode!r}")

    @property
    def trains(self) -> bool:
        return self.blocks != 0


@dataclass(frozen=True)
class Stage:
    """What trains in a curriculum stage: whole parts ("projector", "llm") and how much of the vision tower
    (a recipe can override the tower's share: ScriptArguments.vision_train_blocks / vision_train_mode)."""

    parts: tuple[str, ...]
    vision: VisionTraining = VisionTraining()

    def __contains__(self, part: str) -> bool:
        return part in self.parts or (part == "vision" and self.vision.trains)


# Which parts train in each curriculum stage (LLaVA-Med: stage 1 projector only, later stages projector + LLM;
# the vision tower frozen unless a recipe trains its last blocks).
STAGES: dict[str, Stage] = {
    "align": Stage(("projector",)),
    "instruct": Stage(("projector", "llm")),
    "specialist": Stage(("projector", "llm")),
    "preference": Stage(("projector", "llm")),
}


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_parts(model) -> dict[str, list[nn.Module]]:
    """The three parts of a Llava model (unwrapping a PEFT model if needed)."""
    model = _unwrap(model)
    inner = model.model
    return {
        "vision": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "llm": [inner.language_model, model.lm_head],
    }


def _feature_depth(config, n_blocks: int) -> int:
    """How many of the tower's blocks the selected features pass through (hidden_states[i] follows block i)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    depths = [layer if layer >= 0 else n_blocks + 1 + layer for layer in layers]
    if not all(0 <= d <= n_blocks for d in depths):
        raise ValueError(
            f"vision_feature_layer {config.vision_feature_layer} is outside a {n_blocks}-block tower"
        )
    return max(depths)


def vision_blocks(model) -> tuple[str, list[nn.Module]]:
    """(module path of the tower's block list in the Llava model, the blocks that feed the features, in order).

    Finds the list of transformer blocks whatever the tower (DINOv2 `encoder.layer`, CLIP/SigLIP
    `encoder.layers`): the ModuleList with as many entries as the tower's `num_hidden_layers`.
    """
    model = _unwrap(model)
    tower = model.model.vision_tower
    n_blocks = tower.config.num_hidden_layers
    tower_path = next(name for name, module in model.named_modules() if module is tower)
    lists = [
        (name, module)
        for name, module in tower.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n_blocks
        and name.rsplit(".", 1)[-1] in ("layer", "layers", "blocks")
    ]
    if len(lists) != 1:
        raise ValueError(
            f"cannot find the transformer blocks of the {type(tower).__name__} vision tower (a ModuleList named "
            f"layer/layers/blocks with {n_blocks} entries; found {[name for name, _ in lists]})"
        )
    name, blocks = lists[0]
    depth = _feature_depth(model.config, n_blocks)
    return f"{tower_path}.{name}", list(blocks)[:depth]


def _chosen_blocks(model, blocks: int) -> tuple[str, list[int]]:
    """(block list path, indices of the last `blocks` blocks that feed the features; -1: all of them)."""
    path, feeding = vision_blocks(model)
    if blocks == -1:
        blocks = len(feeding)
    if blocks > len(feeding):
        n_blocks = _unwrap(model).model.vision_tower.config.num_hidden_layers
        raise ValueError(
            f"vision blocks {blocks}: only {len(feeding)} of the tower's {n_blocks} blocks feed the features "
            f"(vision_feature_layer {_unwrap(model).config.vision_feature_layer}); use at most {len(feeding)}, "
            "or -1 for all"
        )
    return path, list(range(len(feeding) - blocks, len(feeding)))


def vision_train_modules(model, blocks: int) -> list[str]:
    """Module paths (in the Llava model) that train in full for `blocks` (VisionTraining.blocks): the chosen
    blocks, or the whole tower for -1. What PEFT's `modules_to_save` gets when the LLM trains by LoRA."""
    if blocks == 0:
        return []
    if blocks == -1:
        tower = model_parts(model)["vision"][0]
        return [next(name for name, module in _unwrap(model).named_modules() if module is tower)]
    path, indices = _chosen_blocks(model, blocks)
    return [f"{path}.{i}" for i in indices]


def vision_lora_target(model, blocks: int) -> str:
    """A PEFT `target_modules` regex for the VISION_LORA_LAYERS linear layers of the last `blocks` blocks
    (-1: every block that feeds the features), matched with or without PEFT's `base_model.model.` prefix."""
    import re

    path, indices = _chosen_blocks(model, blocks)
    block_lists = dict(_unwrap(model).named_modules())[path]
    layers = sorted(
        {
            name
            for i in indices
            for name, module in block_lists[i].named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in VISION_LORA_LAYERS
        }
    )
    if not layers:
        raise ValueError(f"no linear layers named {VISION_LORA_LAYERS} in the vision tower's blocks ({path})")
    index = "|".join(map(str, indices))
    return rf"(?:.*\.)?{re.escape(path)}\.(?:{index})\.(?:{'|'.join(map(re.escape, layers))})"


def freeze_for_stage(
    model, stage: str, train_vision: bool = False, vision: VisionTraining | None = None
) -> dict[str, int]:
    """Set `requires_grad` for a curriculum stage; return the number of trainable parameters per part.

    The tower trains as the stage declares (STAGES[stage].vision) unless `vision` says otherwise;
    `train_vision=True` is the whole tower (VisionTraining(-1)). Full training only: LoRA on the tower is
    PEFT's (train.models.get_model).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; choose one of {sorted(STAGES)}")
    if train_vision:
        if vision is not None and vision != VisionTraining(-1):
            raise ValueError(f"train_vision (the whole tower) contradicts {vision}")
        vision = VisionTraining(-1)
    vision = STAGES[stage].vision if vision is None else vision
    if vision.trains and vision.mode != "full":
        raise ValueError("freeze_for_stage trains parts in full; LoRA on the vision tower goes through PEFT")
    parts = model_parts(model)
    model.requires_grad_(False)
    for name in STAGES[stage].parts:
        for module in parts[name]:
            module.requires_grad_(True)
    modules = dict(_unwrap(model).named_modules())
    for name in vision_train_modules(model, vision.blocks):
        modules[name].requires_grad_(True)
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


def check_image_size(vision_config, image_size: int | None) -> int:
    """The image side a tower reads: any multiple of the patch size for towers that interpolate their position
    embeddings (DINOv2; default DEFAULT_IMAGE_SIZE), their trained size for the others (CLIP, SigLIP)."""
    from medllava.assets import DEFAULT_IMAGE_SIZE

    if _interpolates_positions(vision_config):
        image_size = image_size or DEFAULT_IMAGE_SIZE
    else:
        if image_size not in (None, vision_config.image_size):
            raise ValueError(
                f"{vision_config.model_type} works at its trained size {vision_config.image_size}, not {image_size}"
            )
        image_size = vision_config.image_size
    if image_size <= 0 or image_size % vision_config.patch_size:
        raise ValueError(
            f"image_size {image_size} is not a positive multiple of the patch size {vision_config.patch_size}"
        )
    return image_size


def image_size_of(model) -> int:
    """The image side a Llava model was set up for (from `image_seq_length`: (side / patch)^2 image tokens)."""
    import math

    return math.isqrt(model.config.image_seq_length) * model.config.vision_config.patch_size


def set_image_size(model, processor, image_size: int) -> int:
    """Make a loaded (model, processor) read images at `image_size` px; returns the image tokens per image.

    The weights do not depend on the side (DINOv2 interpolates its position embeddings): only the processor's
    resize and `config.image_seq_length` change, and both are saved with the model.
    """
    vision_config = model.config.vision_config
    image_size = check_image_size(vision_config, image_size)
    processor.image_processor = make_image_processor(image_size, processor.image_processor)
    model.config.image_seq_length = (image_size // vision_config.patch_size) ** 2
    return model.config.image_seq_length


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

    vision_model, vision_processor = load_vision(vision, dtype=dtype)
    llm_model, tokenizer = load_llm(llm, tokenizer=tokenizer, dtype=dtype)
    vcfg, tcfg = vision_model.config, llm_model.config

    image_size = check_image_size(vcfg, image_size)
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
        # vLLM builds the language model that `text_config.architectures` names (an in-memory LLM has none)
        text_config=tcfg.to_dict()
        | {"model_type": tcfg.model_type, "architectures": tcfg.architectures or [type(llm_model).__name__]},
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
    change); other changed tensors (the projector, vision blocks trained in full) in full. The trained model's
    image side goes into the file's metadata (`image_size`), so `apply_delta` rebuilds its processor too.
    Returns {tensor: stored numel}.
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
    metadata = {"format": "medllava-delta-v1", "image_size": str(image_size_of(trained_model))}
    save_file(delta, str(out_dir / "delta.safetensors"), metadata=metadata)
    return sizes


def apply_delta(base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path) -> None:
    """Base checkpoint + delta -> a full plain-HF Llava checkpoint in out_dir (at the delta's image side, if it
    records one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base_dir)
    path = str(Path(delta_dir) / "delta.safetensors")
    with safe_open(path, framework="pt") as f:
        image_size = (f.metadata() or {}).get("image_size")
    if image_size and int(image_size) != image_size_of(model):
        set_image_size(model, processor, int(image_size))
    delta = load_file(path)
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
    processor.save_pretrained(out_dir)
