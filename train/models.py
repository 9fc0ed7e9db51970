"""The model a training run starts from: loaded (the LLM optionally quantized), set to the recipe's image side,
frozen for its curriculum stage or wrapped in LoRA (on the LLM, on the vision tower's last blocks, or both), and the
per-part learning rates (projector_lr, vision_lr) in the optimizer."""

from __future__ import annotations

import logging

import torch

from medllava.assets import resolve_model
from medllava.modeling import (
    STAGES,
    count_trainable,
    freeze_for_stage,
    set_image_size,
    vision_lora_target,
    vision_train_modules,
)
from medllava.token_budget import enable_pooling
from train.configs import PART_LR_FIELDS
from train.trl_lm_head_patch import score_labelled_positions_only

logger = logging.getLogger("medllava.train")

# Quantize the LLM only: the projector trains in full (modules_to_save) and the vision tower stays exact.
QUANTIZATION_SKIP_MODULES = [".*multi_modal_projector", ".*vision_tower", "lm_head"]


def get_quantization_config(model_args):
    """BitsAndBytesConfig for QLoRA (4-bit NF4) or 8-bit loading of the LLM; None otherwise.

    TRL's helper would quantize the projector too (its Linear layers), which then cannot train as a module to save.
    bitsandbytes 0.50 also runs 4-bit on CPU (slowly): QLoRA works there for tests and smoke runs.
    """
    from transformers import BitsAndBytesConfig

    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES)
    compute_dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "bfloat16"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES,
    )


def get_kbit_device_map():
    """A quantized model is placed at load time: this process's GPU, or the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from trl import get_kbit_device_map as trl_device_map

    return trl_device_map()


def _as_regex(targets) -> str:
    """PEFT target_modules as one regex: a regex stays one; a list of names means "named so, or ending in .name"."""
    import re

    if isinstance(targets, str):
        if targets == "all-linear":
            raise ValueError(
                "lora_target_modules 'all-linear' already adapts every linear layer, the vision tower's included: "
                "name the LLM's layers (the default regex) to add LoRA on the tower's last blocks"
            )
        return targets
    return rf"(?:.*\.)?(?:{'|'.join(map(re.escape, targets))})"


def get_peft_config(model_args, model=None, vision=None):
    """LoRA on the LLM (use_peft: lora_target_modules, the projector in lora_modules_to_save) and/or on the vision
    tower's last blocks (`vision`, a medllava.modeling.VisionTraining for `model`): their linear layers join the
    targets ('lora'), or the blocks join modules_to_save ('full')."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules if model_args.use_peft else None
    modules_to_save = list(model_args.lora_modules_to_save or [])
    if vision is not None and vision.trains:
        if vision.mode == "lora":
            tower = vision_lora_target(model, vision.blocks)
            targets = tower if targets is None else f"(?:{_as_regex(targets)})|(?:{tower})"
        else:
            modules_to_save += vision_train_modules(model, vision.blocks)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
        # a Llava model is not an AutoModelForCausalLM: keep PEFT's plain wrapper
        task_type=None,
    )


def get_model(model_args, script_args, training_args):
    """(model, processor): load, set the image side, freeze for the stage, and wrap in LoRA if asked (on the LLM,
    use_peft; on the tower, vision_train_mode 'lora'). Logs the trainable counts."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, set_seed

    # LoRA's initial weights come from the global RNG: same seed, same run
    set_seed(training_args.seed)
    score_labelled_positions_only(script_args.lm_head_labelled_only)
    path = resolve_model(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    model = LlavaForConditionalGeneration.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
        device_map=get_kbit_device_map() if quantization_config is not None else None,
    )
    # SFT rows over the image-token budget are encoded with fewer tokens per image (medllava.token_budget);
    # DPO and GRPO rows go through TRL's processing, which never pools, so for them this changes nothing
    enable_pooling(model)
    processor = AutoProcessor.from_pretrained(path, revision=model_args.model_revision)
    if script_args.image_size is not None:
        tokens = set_image_size(model, processor, script_args.image_size)
        logger.info("images at %d px: %d image tokens each", script_args.image_size, tokens)
    stage, vision = STAGES[script_args.stage], script_args.vision_training()
    tower_lora = vision.trains and vision.mode == "lora"
    if not (model_args.use_peft or tower_lora):
        freeze_for_stage(model, script_args.stage, vision=vision)
    else:
        # PEFT freezes the whole base except the adapters and modules_to_save (the projector, tower blocks)
        if model_args.use_peft and "llm" not in stage.parts:
            raise ValueError(
                f"stage '{script_args.stage}' trains only the projector: LoRA on the LLM does not apply (use_peft)"
            )
        if not model_args.use_peft and "llm" in stage.parts:
            raise ValueError(
                f"vision_train_mode 'lora' puts the model under PEFT, and stage '{script_args.stage}' trains the "
                "LLM: set use_peft (LoRA on the LLM too) or train the tower's blocks in full (vision_train_mode: full)"
            )
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantization_config is not None:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=training_args.gradient_checkpointing
            )
        model = get_peft_model(model, get_peft_config(model_args, model, vision))
    logger.info(
        "model %s, stage %s, vision %s, trainable parameters per part: %s",
        path,
        script_args.stage,
        vision,
        count_trainable(model),
    )
    return model, processor


class PartLRMixin:
    """Mixed into TRL's trainers: per-part learning rates (`projector_lr`, LLaVA's mm_projector_lr; `vision_lr`,
    the vision tower's; transformers' Trainer has one rate for every parameter). Same schedule as the others.
    A parameter belongs to a part if its name contains the part's module (PART_LR_FIELDS), LoRA and PEFT's
    modules_to_save copies included."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        rates = {name: getattr(self.args, name, None) for name in PART_LR_FIELDS}
        rates = {name: lr for name, lr in rates.items() if lr is not None}
        if not rates or getattr(self, "_part_lr_groups", False):
            return optimizer
        model = self.model if model is None else model
        owner = {
            id(p): name
            for n, p in model.named_parameters()
            for name, module in PART_LR_FIELDS.items()
            if name in rates and module in n
        }
        groups = []
        # each Trainer group (decay / no decay) split by part: the other parameters first, then each part's
        for group in optimizer.param_groups:
            split = {None: []} | {name: [] for name in rates}
            for p in group["params"]:
                split[owner.get(id(p))].append(p)
            groups += [
                {**group, "params": ps, "lr": group["lr"] if name is None else rates[name]}
                for name, ps in split.items()
                if ps
            ]
        # no step taken yet: there is no per-parameter state to move
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        self._part_lr_groups = True
        logger.info(
            "learning rates: %s (others %g)",
            ", ".join(f"{name} {lr:g}" for name, lr in rates.items()),
            self.args.learning_rate,
        )
        return optimizer
