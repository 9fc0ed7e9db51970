"""Training entry points (sft.py, dpo.py, grpo.py), their configs, recipes and accelerate configs."""
