"""The model a training run starts from: loaded (the LLM optionally quantized), frozen for its curriculum stage or
wrapped in LoRA, and the projector's own learning rate in the optimizer."""

from __future__ import annotations

import logging

import torch

from medllava.assets import resolve_model
from medllava.modeling import PROJECTOR_MODULE, count_trainable, freeze_for_stage
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


def get_peft_config(model_args):
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
        # a Llava model is not an AutoModelForCausalLM: keep PEFT's plain wrapper
        task_type=None,
    )


def get_model(model_args, script_args, training_args):
    """(model, processor): load, freeze for the stage, and wrap in LoRA if asked. Logs the trainable counts."""
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
    processor = AutoProcessor.from_pretrained(path, revision=model_args.model_revision)
    if not model_args.use_peft:
        freeze_for_stage(model, script_args.stage, train_vision=script_args.train_vision)
    else:
        # PEFT freezes the whole base except the adapters and modules_to_save (the projector)
        if script_args.stage == "align":
            raise ValueError(
                "stage 'align' trains only the projector: LoRA on the LLM does not apply (use_peft)"
            )
        if script_args.train_vision:
            raise ValueError("train_vision with use_peft is not supported: LoRA adapts the LLM only")
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantization_config is not None:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=training_args.gradient_checkpointing
            )
        model = get_peft_model(model, get_peft_config(model_args))
    logger.info(
        "model %s, stage %s, trainable parameters per part: %s",
        path,
        script_args.stage,
        count_trainable(model),
    )
    return model, processor


class ProjectorLRMixin:
    """Mixed into TRL's trainers: the projector's own learning rate (`projector_lr`, LLaVA's mm_projector_lr;
    transformers' Trainer has one rate for every parameter). Same schedule as the others."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "projector_lr", None)
        if lr is None or getattr(self, "_projector_groups", False):
            return optimizer
        model = self.model if model is None else model
        projector = {id(p) for n, p in model.named_parameters() if PROJECTOR_MODULE in n}
        groups = []
        # each Trainer group (decay / no decay) split in two: the projector's parameters and the rest
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in projector]
            own = [p for p in group["params"] if id(p) in projector]
            groups += [{**group, "params": ps, "lr": r} for ps, r in ((rest, group["lr"]), (own, lr)) if ps]
        # no step taken yet: there is no per-parameter state to move
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        self._projector_groups = True
        logger.info("projector learning rate %g (others %g)", lr, self.args.learning_rate)
        return optimizer
