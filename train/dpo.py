"""Direct Preference Optimization with images through TRL's DPOTrainer (stage `preference`).

Rows: {"id", "images", "prompt": [user turns], "chosen": [assistant turn], "rejected": [assistant turn]}.
Images load lazily (medllava.processing.load_image, so DICOM/NIfTI work). The frozen reference is the starting
checkpoint loaded again by TRL (`precompute_ref_log_probs` is refused for images); with LoRA the reference is
the base with the adapter disabled. Rows longer than max_length are dropped and counted, never truncated.

Usage:
    accelerate launch --config_file train/accelerate/single.yaml train/dpo.py \\
        --config train/recipes/starter/dpo.yaml --max_steps 2
    make train-dpo ARGS='--max_steps 2'
"""

from __future__ import annotations

from trl import DPOTrainer, TrlParser

from train.configs import DPOConfig, ModelConfig, ScriptArguments
from train.data import get_datasets
from train.models import get_model
from train.run import setup_logging, train_and_save, trainer_class


def main(
    script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig, callbacks=None
) -> dict:
    setup_logging(training_args)
    model, processor = get_model(model_args, script_args, training_args)
    train_dataset, eval_dataset, report = get_datasets(
        script_args, processor, training_args.max_length, "dpo", load_images=True
    )
    # ref_model=None: TRL loads model_name_or_path again, frozen (prepared for DeepSpeed); with PEFT the reference
    # is the same model with its adapter disabled
    trainer = trainer_class(DPOTrainer)(
        model=model,
        ref_model=None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    return train_and_save(trainer, script_args, training_args, processor, report)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
