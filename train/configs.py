"""Configuration dataclasses of the training entry points, subclassing TRL's, validated in `__post_init__`.

A recipe (train/recipes/<target>/<stage>.yaml) sets fields of these classes one-to-one; flags on the command line
override it (TRL's TrlParser). Each entry point parses three of them:

    train/sft.py   (ScriptArguments, SFTConfig,  ModelConfig)
    train/dpo.py   (ScriptArguments, DPOConfig,  ModelConfig)
    train/grpo.py  (GRPOScriptArguments, GRPOConfig, ModelConfig)

Usage (prints the parsed configuration of a recipe without training; flags after it override the recipe):
    python -m train.configs sft train/recipes/starter/stage2_instruct.yaml --learning_rate 1e-5
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl

from medllava.modeling import LLM_LORA_TARGET_MODULES, PROJECTOR_MODULE, STAGES

# Values of `resume_from_checkpoint` that mean "start from scratch even if the output dir holds checkpoints".
NO_RESUME = ("no", "false", "none", "never")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """Data and curriculum-stage arguments (TRL's `dataset_name` is not used: data are schema JSONL files)."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Training rows, schema JSONL (image paths relative to this file's directory)."},
    )
    eval_file: str | None = field(default=None, metadata={"help": "Optional evaluation rows, schema JSONL."})
    image_root: str | None = field(
        default=None,
        metadata={"help": "Directory image paths are relative to (default: each JSONL file's own)."},
    )
    allow_root: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Folders outside the image root that image paths may resolve into (also --allow-root); the image "
            "root and the folders its converter recorded in image_roots.json are always allowed."
        },
    )
    stage: str = field(
        default="instruct",
        metadata={"help": "Curriculum stage; decides what trains.", "choices": sorted(STAGES)},
    )
    train_vision: bool = field(
        default=False, metadata={"help": "Also train the vision tower (full fine-tuning)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (quick runs)."}
    )
    answer_suffix: bool = field(
        default=False,
        metadata={
            "help": "Append eval's per-answer-type instruction (medllava.prompts.ANSWER_SUFFIXES, e.g. 'Answer yes or "
            "no.') to the last user turn of rows with an answer_type, so VQA rows train on the prompts `make eval` "
            "asks."
        },
    )
    lm_head_labelled_only: bool = field(
        default=True,
        metadata={
            "help": "On CPU, run the LM head only on positions with a label, as TRL does on CUDA (false: TRL's "
            "CPU default, every position; same loss, slower)."
        },
    )
    malloc_trim_gib: float | None = field(
        default=None,
        metadata={
            "help": "After a training step that leaves the process above this many GiB resident, return glibc's "
            "free heap pages to the kernel (malloc_trim; see docs/train.md on memory). Default: never."
        },
    )
    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "LoRA runs: save the merged plain Llava at the output root (the adapter goes to adapter/)."
        },
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not one of {sorted(STAGES)}")
        if self.dataset_name is not None:
            raise ValueError(
                "dataset_name is not used by MedLLaVA: set train_file (a schema JSONL file) instead"
            )
        if not self.train_file:
            raise ValueError(
                "train_file is required (a schema JSONL file, e.g. data/medsynth/instruct_train.jsonl)"
            )
        if self.malloc_trim_gib is not None and self.malloc_trim_gib <= 0:
            raise ValueError(f"malloc_trim_gib must be > 0 GiB, got {self.malloc_trim_gib}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, got {self.max_train_samples}")


@dataclass
class GRPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "accuracy"],
        metadata={
            "help": "Reward functions by name (medllava.rewards.REWARD_FUNCS); weights: reward_weights."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System turn added to prompts without one (default: medllava.prompts.FORMAT_SYSTEM_PROMPT, "
            "which asks for the <answer> format); '' keeps the rows as they are."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        from medllava.prompts import FORMAT_SYSTEM_PROMPT
        from medllava.rewards import REWARD_FUNCS

        if self.system_prompt is None:
            self.system_prompt = FORMAT_SYSTEM_PROMPT
        unknown = [name for name in self.reward_funcs if name not in REWARD_FUNCS]
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; choose from {sorted(REWARD_FUNCS)}")


@dataclass
class ModelConfig(trl.ModelConfig):
    """The model to start from and how it is adapted (full, LoRA, QLoRA)."""

    model_name_or_path: str | None = field(
        default="base",
        metadata={
            "help": "'base' (the untrained packaged base), 'default' or 'starter' (medllava.assets.resolve_model), "
            "a Llava dir or a hub id."
        },
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: [LLM_LORA_TARGET_MODULES],
        metadata={"help": "LoRA targets; the default regex adapts the LLM's linear layers only."},
    )
    lora_modules_to_save: list[str] | None = field(
        default_factory=lambda: [PROJECTOR_MODULE],
        metadata={"help": "Modules trained and saved in full next to the adapter (the projector)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required ('base' for the untrained packaged base)")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError(
                "load_in_4bit / load_in_8bit (QLoRA) need use_peft: true (a quantized base cannot train)"
            )


def projector_lr_field():
    return field(
        default=None,
        metadata={
            "help": "Learning rate of the projector's parameters (LLaVA's mm_projector_lr); default: learning_rate. "
            "Same schedule as the other parameters."
        },
    )


def _use_cpu_without_cuda(args) -> None:
    # transformers refuses bf16 on a machine without CUDA unless use_cpu is set, and two CPU processes only form a
    # DDP group (gloo) with use_cpu; so a machine without CUDA always trains with use_cpu.
    if not args.use_cpu and not torch.cuda.is_available():
        args.use_cpu = True


def _check_common(args) -> None:
    if args.remove_unused_columns:
        raise ValueError("remove_unused_columns must be false: images and messages are read by the collator")


@dataclass
class SFTConfig(trl.SFTConfig):
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay false (see the collator)."}
    )
    dataset_kwargs: dict | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "skip_prepare_dataset: the collator renders and tokenises each batch itself."},
    )
    report_to: None | str | list[str] = field(default="tensorboard")
    projector_lr: float | None = projector_lr_field()

    def __post_init__(self):
        _use_cpu_without_cuda(self)
        super().__post_init__()
        _check_common(self)
        if self.assistant_only_loss or self.completion_only_loss:
            raise ValueError(
                "assistant_only_loss / completion_only_loss must be false: medllava's AssistantOnlyCollator "
                "already restricts the loss to assistant tokens"
            )
        if self.packing or self.padding_free:
            raise ValueError("packing / padding_free are not supported for image conversations")
        if not (self.dataset_kwargs or {}).get("skip_prepare_dataset"):
            raise ValueError(
                "dataset_kwargs must contain skip_prepare_dataset: true (the collator tokenises)"
            )


@dataclass
class DPOConfig(trl.DPOConfig):
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay false (images are loaded lazily)."}
    )
    report_to: None | str | list[str] = field(default="tensorboard")
    projector_lr: float | None = projector_lr_field()

    def __post_init__(self):
        _use_cpu_without_cuda(self)
        super().__post_init__()
        _check_common(self)
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs is not supported by TRL for image datasets; set it to false"
            )


@dataclass
class GRPOConfig(trl.GRPOConfig):
    report_to: None | str | list[str] = field(default="tensorboard")
    projector_lr: float | None = projector_lr_field()

    def __post_init__(self):
        _use_cpu_without_cuda(self)
        super().__post_init__()
        _check_common(self)
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (GRPO compares completions of the same prompt)")
        if self.use_vllm and not torch.cuda.is_available():
            raise ValueError("use_vllm needs a GPU")


def check_reward_weights(script_args: GRPOScriptArguments, training_args: GRPOConfig) -> None:
    """reward_weights (GRPOConfig) must give one weight per reward function (GRPOScriptArguments)."""
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(script_args.reward_funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} value(s) but reward_funcs names {len(script_args.reward_funcs)}: "
            f"{script_args.reward_funcs}"
        )


CONFIG_CLASSES = {
    "sft": (ScriptArguments, SFTConfig, ModelConfig),
    "dpo": (ScriptArguments, DPOConfig, ModelConfig),
    "grpo": (GRPOScriptArguments, GRPOConfig, ModelConfig),
}


def parse(algorithm: str, args: list[str] | None = None):
    """(script_args, training_args, model_args) from `--config recipe.yaml` plus flags (TRL's TrlParser)."""
    parser = trl.TrlParser(CONFIG_CLASSES[algorithm])
    return parser.parse_args_and_config(args=args)


def recipe_algorithm(path: str) -> str:
    """Which entry point a recipe is for: dpo / grpo by file name, sft otherwise."""
    name = path.rsplit("/", 1)[-1]
    return "dpo" if name.startswith("dpo") else "grpo" if name.startswith("grpo") else "sft"


def _cli(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m train.configs", description="Print a recipe's parsed configuration."
    )
    parser.add_argument("algorithm", choices=sorted(CONFIG_CLASSES), help="the entry point the recipe is for")
    parser.add_argument("recipe", help="a YAML recipe, e.g. train/recipes/starter/stage2_instruct.yaml")
    args, overrides = parser.parse_known_args(argv)
    for parsed in parse(args.algorithm, ["--config", args.recipe, *overrides]):
        print(parsed)


if __name__ == "__main__":
    _cli()
