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

from medllava.modeling import (
    LLM_LORA_TARGET_MODULES,
    PROJECTOR_MODULE,
    STAGES,
    VISION_MODES,
    VISION_MODULE,
    VisionTraining,
)

# Values of `resume_from_checkpoint` that mean "start from scratch even if the output dir holds checkpoints".
NO_RESUME = ("no", "false", "none", "never")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """Data and curriculum-stage arguments (TRL's `dataset_name` is not used: data are schema JSONL files)."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Training rows, schema JSONL (image paths relative to this file's directory)."},
    )
    mix_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More schema JSONL files whose rows are mixed into train_file's (e.g. caption and conversation "
            "rows replayed in a VQA stage); each makes up its mix_fractions share of the training rows."
        },
    )
    mix_fractions: list[float] = field(
        default_factory=list,
        metadata={
            "help": "One per mix file: its share of the mixed training rows (0 < f < 1, sum < 1; train_file's rows, "
            "all of them, make up the rest). A file's first rows are taken, repeated if it has too few."
        },
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
        default=False,
        metadata={"help": "Also train the whole vision tower in full (the same as vision_train_blocks: -1)."},
    )
    vision_train_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Train the vision tower's last K blocks among those that feed the features (0: frozen; -1: "
            "all; default: the stage's, medllava.modeling.STAGES). Learning rate: vision_lr."
        },
    )
    vision_train_mode: str | None = field(
        default=None,
        metadata={
            "help": "'full': those blocks train in full (with use_peft: as PEFT modules_to_save); 'lora': LoRA "
            "(lora_r, lora_alpha) on their attention and MLP linear layers. Default: the stage's.",
            "choices": list(VISION_MODES),
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Read images at this side in px (a multiple of 14: 112, 168, 224) instead of the starting "
            "model's: the processor is resized at load and saved with the model (DINOv2 towers only)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of train_file (quick runs)."}
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
    findings_loss: float = field(
        default=0.0,
        metadata={
            "help": "SFT only: add this weight x an auxiliary loss in which linear heads on the projected image tokens "
            "predict medsynth's ground truth (train/findings.py; labels from instances_<split>.jsonl beside the "
            "training files). 0: off."
        },
    )
    findings_heads: str = field(
        default="linear",
        metadata={
            "help": "findings_loss heads: 'linear' (one learned linear head per fact on [mean; max] of the projected "
            "tokens) or 'words' (no weights: each fact scored by the tokens' cosine to the LLM's embedding of the "
            "word a caption uses, as train.findings_words does)."
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
        if self.findings_heads not in ("linear", "words"):
            raise ValueError(f"findings_heads must be 'linear' or 'words', got {self.findings_heads!r}")
        if self.malloc_trim_gib is not None and self.malloc_trim_gib <= 0:
            raise ValueError(f"malloc_trim_gib must be > 0 GiB, got {self.malloc_trim_gib}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be > 0 px, got {self.image_size}")
        self.vision_training()
        if len(self.mix_fractions) != len(self.mix_files):
            raise ValueError(
                f"mix_fractions has {len(self.mix_fractions)} value(s) for {len(self.mix_files)} mix_files: give "
                "one share per file"
            )
        if not all(0 < f < 1 for f in self.mix_fractions) or sum(self.mix_fractions) >= 1:
            raise ValueError(
                f"mix_fractions {self.mix_fractions}: each must be between 0 and 1 and their sum below 1 (train_file's "
                "rows are the rest)"
            )

    def vision_training(self) -> VisionTraining:
        """How the vision tower trains: the stage's default (STAGES) with this recipe's overrides."""
        default = STAGES[self.stage].vision
        if self.train_vision:
            if self.vision_train_blocks not in (None, -1) or self.vision_train_mode not in (None, "full"):
                raise ValueError(
                    "train_vision (the whole tower in full) contradicts vision_train_blocks="
                    f"{self.vision_train_blocks}, vision_train_mode={self.vision_train_mode}: set only the latter"
                )
            return VisionTraining(-1, "full")
        blocks = default.blocks if self.vision_train_blocks is None else self.vision_train_blocks
        return VisionTraining(blocks, self.vision_train_mode or default.mode)


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


# Per-part learning rates: the training config field and the module its parameters' names contain.
PART_LR_FIELDS = {"projector_lr": PROJECTOR_MODULE, "vision_lr": VISION_MODULE}


def part_lr_field(part: str):
    return field(
        default=None,
        metadata={
            "help": f"Learning rate of the {part}'s parameters; default: learning_rate. Same schedule as the "
            "other parameters."
        },
    )


def _check_part_lrs(args) -> None:
    for name in PART_LR_FIELDS:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _use_cpu_without_cuda(args) -> None:
    # transformers refuses bf16 on a machine without CUDA unless use_cpu is set, and two CPU processes only form a
    # DDP group (gloo) with use_cpu; so a machine without CUDA always trains with use_cpu.
    if not args.use_cpu and not torch.cuda.is_available():
        args.use_cpu = True


def _check_common(args) -> None:
    _check_part_lrs(args)
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
    projector_lr: float | None = part_lr_field("projector (LLaVA's mm_projector_lr)")
    vision_lr: float | None = part_lr_field("vision tower")

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
    projector_lr: float | None = part_lr_field("projector (LLaVA's mm_projector_lr)")
    vision_lr: float | None = part_lr_field("vision tower")

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
    projector_lr: float | None = part_lr_field("projector (LLaVA's mm_projector_lr)")
    vision_lr: float | None = part_lr_field("vision tower")

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
