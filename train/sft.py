"""Supervised fine-tuning for the curriculum stages (align, instruct, specialist), full or LoRA/QLoRA, with TRL.

Loss on assistant tokens only (medllava.processing.AssistantOnlyCollator); over-long rows are dropped and
counted before training, never truncated. Output: a plain HF Llava checkpoint + processor, loss_curve.png,
TensorBoard logs (runs/) and train_report.json in output_dir; a killed run resumes from its last checkpoint.

Usage:
    accelerate launch --config_file train/accelerate/single.yaml train/sft.py \\
        --config train/recipes/starter/stage2_instruct_lora.yaml --max_steps 2
    make train-stage2 ARGS='--max_steps 2'
"""

from __future__ import annotations

from trl import SFTTrainer, TrlParser

from medllava.processing import AssistantOnlyCollator
from train.configs import ModelConfig, ScriptArguments, SFTConfig
from train.data import get_datasets
from train.findings import FindingsCollator, FindingsHeads, FindingsLabels, FindingsMixin, WordHeads
from train.models import get_model
from train.run import setup_logging, train_and_save, trainer_class


def main(
    script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, callbacks=None
) -> dict:
    setup_logging(training_args)
    model, processor = get_model(model_args, script_args, training_args)
    train_dataset, eval_dataset, report = get_datasets(
        script_args,
        processor,
        training_args.max_length,
        "sft",
        length_column=training_args.length_column_name,
    )
    collator, trainer_base = AssistantOnlyCollator(processor), SFTTrainer
    if script_args.findings_loss:
        labels = FindingsLabels([script_args.train_file, *script_args.mix_files])
        collator, trainer_base = (
            FindingsCollator(processor, labels),
            type("SFTTrainer", (FindingsMixin, SFTTrainer), {}),
        )
    # no truncation in the collator: rows over max_length were dropped (and counted) by get_datasets
    trainer = trainer_class(trainer_base)(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    if script_args.findings_loss:
        if script_args.findings_heads == "words":
            embeddings = model.get_input_embeddings().weight
            trainer.findings_heads = WordHeads(embeddings, processor.tokenizer, labels.classes)
        else:
            trainer.findings_heads = FindingsHeads(model.config.text_config.hidden_size, labels.classes)
        trainer.findings_weight = script_args.findings_loss
    return train_and_save(trainer, script_args, training_args, processor, report)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
