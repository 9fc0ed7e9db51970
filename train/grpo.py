"""Group Relative Policy Optimization with images through TRL's GRPOTrainer, rewards from medllava.rewards.

Rows: {"id", "images", "prompt": [messages without the answer], "solution", "answer_type", ...}. Every dataset
column reaches the reward functions (REWARD_FUNCS[name], weighted by reward_weights). Prompts without a system
turn get medllava.prompts.FORMAT_SYSTEM_PROMPT, which asks for the `<answer>` format the `format` reward checks
(set `system_prompt: ""` to keep the rows as they are). Generation is plain transformers `generate` (no vLLM on
CPU); beta > 0 adds a KL penalty against model_name_or_path loaded again.

Usage:
    accelerate launch --config_file train/accelerate/single.yaml train/grpo.py \\
        --config train/recipes/starter/grpo.yaml --max_steps 2
    make train-grpo ARGS='--max_steps 2'
"""

from __future__ import annotations

from trl import GRPOTrainer, TrlParser

from medllava.rewards import get_reward_funcs
from train.configs import GRPOConfig, GRPOScriptArguments, ModelConfig, check_reward_weights
from train.data import get_datasets, lazy_images
from train.models import get_model
from train.run import setup_logging, train_and_save, trainer_class


def with_system_prompt(dataset, system_prompt: str):
    """Prepend a system turn to prompts that have none."""
    if not system_prompt or dataset is None:
        return dataset
    system = {"role": "system", "content": [{"type": "text", "text": system_prompt}]}

    def add(row):
        prompt = row["prompt"]
        return {"prompt": prompt if prompt and prompt[0]["role"] == "system" else [system, *prompt]}

    return dataset.map(add, desc="system prompt")


def main(
    script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: ModelConfig, callbacks=None
) -> dict:
    setup_logging(training_args)
    check_reward_weights(script_args, training_args)
    model, processor = get_model(model_args, script_args, training_args)
    train_dataset, eval_dataset, report = get_datasets(script_args, processor, None, "grpo")
    train_dataset = lazy_images(with_system_prompt(train_dataset, script_args.system_prompt))
    eval_dataset = lazy_images(with_system_prompt(eval_dataset, script_args.system_prompt))
    trainer = trainer_class(GRPOTrainer)(
        model=model,
        reward_funcs=get_reward_funcs(script_args.reward_funcs),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    return train_and_save(trainer, script_args, training_args, processor, report)


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
