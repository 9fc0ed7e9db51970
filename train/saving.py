"""What a finished run leaves in output_dir: a plain HF Llava + processor (LoRA merged, the adapter kept in
adapter/), loss_curve.png and train_report.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger("medllava.train")


def merge_lora(peft_model, adapter_dir: Path):
    """The LoRA merged into a plain Llava. A quantized (QLoRA) base is reloaded in full precision first, so the
    merged checkpoint is an ordinary one rather than a rounded 4-bit model."""
    base = peft_model.get_base_model()
    if not getattr(base, "is_quantized", False):
        return peft_model.merge_and_unload()
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    path = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    full = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()


def _enable_cache(model) -> None:
    for config in (model.config, model.config.get_text_config()):
        config.use_cache = True


def save_final(trainer, script_args, training_args, processor, report: dict) -> None:
    """output_dir/: plain HF Llava + processor (LoRA merged, adapter kept in adapter/), loss_curve.png, report."""
    out = Path(training_args.output_dir)
    model = trainer.model
    if hasattr(model, "peft_config"):
        trainer.save_model(str(out / "adapter"))
        if script_args.merge_lora:
            trainer.accelerator.wait_for_everyone()
            if trainer.accelerator.is_main_process:
                merged = merge_lora(trainer.accelerator.unwrap_model(model), out / "adapter")
                _enable_cache(merged)
                merged.save_pretrained(out)
                processor.save_pretrained(out)
        elif trainer.accelerator.is_main_process:
            processor.save_pretrained(out / "adapter")
    else:
        _enable_cache(trainer.accelerator.unwrap_model(model))
        trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(out)
        plot_loss_curve(
            trainer.state.log_history, out / "loss_curve.png", title=f"{script_args.stage}: {out.name}"
        )
        (out / "train_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        logger.info("saved %s (loss curve: %s)", out, out / "loss_curve.png")
    trainer.accelerator.wait_for_everyone()


def plot_loss_curve(log_history: list[dict], path: Path, title: str = "") -> None:
    """Training loss (and eval loss, GRPO reward if logged) per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        for key in ("loss", "eval_loss", "reward")
    }
    series = {k: v for k, v in series.items() if v}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title or "training")
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
