"""What sft.py, dpo.py and grpo.py share: model loading and freezing, PEFT, data, checkpoints, resume, saving.

Only the entry points import this module; each reads top to bottom: model, data, trainer, train, save.

Checkpoints. transformers' Trainer writes `checkpoint-N/` in place, and on resume loads a full model's weights
non-strictly: a Llava checkpoint is saved in the legacy key layout (`language_model.model.layers.*`), nothing
matches, and training silently continues from the initial weights (see shared TRAINING-NOTES.md, "the resume
trap"). `CheckpointMixin` fixes both: a checkpoint is written to a staging directory and renamed into place when
complete, and resuming loads the weights through `from_pretrained` (which maps the legacy keys) and then
`load_state_dict(strict=True)`. `find_checkpoint` skips an incomplete or corrupt last checkpoint with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from medllava.assets import resolve_model
from medllava.modeling import PROJECTOR_MODULE, count_trainable, freeze_for_stage
from medllava.processing import load_image
from medllava.prompts import add_answer_suffix
from medllava.schema import SchemaError, read_valid_rows, row_kind, token_length
from train.configs import NO_RESUME

logger = logging.getLogger("medllava.train")
STAGING_DIR = ".staging"
COMPLETE_MARKER = ".complete"


def setup_logging(training_args) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


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
        task_type=None,  # a Llava model is not an AutoModelForCausalLM: keep PEFT's plain wrapper
    )


def score_labelled_positions_only(enabled: bool = True) -> bool:
    """Make TRL's fused LM head project only the positions that carry a label on CPU too (or, with
    `enabled=False`, put TRL's own test back). Returns whether labelled-only scoring is on.

    TRL's trainers compute the loss through `add_fused_lm_head`, which on CUDA/XPU runs the LM head only on the
    positions whose next token is labelled but elsewhere scores every position (TRL's reason: fixed tile shapes,
    so Neuron does not recompile on every batch). Eager CPU has no compilation to protect, and in VQA training
    ~90% of positions (image, system prompt, questions) carry no label: the LM head over SmolLM2's 49,152-token
    vocabulary is a fifth of a step's matrix work. Same loss, same metrics; a grouped stage-3 step of the starter
    went from 20.6 to 16.1 s (docs/train.md). TRL has no option for it, hence this switch of its private test
    (recipes: `lm_head_labelled_only`); a TRL version without that test is left alone, with a warning.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    current = getattr(trl_utils, "_use_triton", None)
    if current is None or not hasattr(trl_utils, "add_fused_lm_head"):
        if enabled:
            logger.warning("this TRL has no fused LM head test to switch: every position is scored on CPU")
        return False
    original = getattr(current, "_medllava_original", current)
    if not enabled:
        trl_utils._use_triton = original
        return False

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    compact._medllava_original = original
    trl_utils._use_triton = compact
    return True


def get_model(model_args, script_args, training_args):
    """(model, processor): load, freeze for the stage, and wrap in LoRA if asked. Logs the trainable counts."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, set_seed

    set_seed(training_args.seed)  # LoRA's initial weights come from the global RNG: same seed, same run
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
    else:  # PEFT freezes the whole base except the adapters and modules_to_save (the projector)
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


def get_kbit_device_map():
    """A quantized model is placed at load time: this process's GPU, or the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from trl import get_kbit_device_map as trl_device_map

    return trl_device_map()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_rows(path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Schema rows with image paths made absolute (relative to `image_root`, default the file's directory).

    A malformed row or a missing image is an error naming the file, line and reason (fix the data, do not skip).
    """
    rows = [
        {**row, "images": [str(Path(p).resolve()) for p in row["images"]]}
        for _, row in read_valid_rows(path, image_root, require_images=True, limit=limit)
    ]
    if not rows:
        raise SchemaError(f"{path}: no rows")
    return rows


def drop_long_rows(
    rows: list[dict], lengths: list[int], max_length: int | None, path
) -> tuple[list[dict], int, list[int]]:
    """(kept rows, how many were dropped, their token lengths), given each row's token length after image
    expansion. Rows longer than max_length tokens are dropped and counted, never truncated."""
    if max_length is None:
        return rows, 0, lengths
    kept = [(row, n) for row, n in zip(rows, lengths, strict=True) if n <= max_length]
    dropped = len(rows) - len(kept)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows longer than max_length=%d tokens (image tokens are never truncated)",
            path,
            dropped,
            len(rows),
            max_length,
        )
    if not kept:
        raise ValueError(f"{path}: every row is longer than max_length={max_length}; raise max_length")
    return [row for row, _ in kept], dropped, [n for _, n in kept]


def _load_images_transform(batch: dict) -> dict:
    batch = dict(batch)
    batch["images"] = [[load_image(p) for p in paths] for paths in batch["images"]]
    return batch


def lazy_images(dataset):
    """Image paths -> PIL images (medllava.processing.load_image) when a row is read, for TRL's DPO/GRPO, whose
    collators want decoded images. Apply last: a later `map` would decode every image once."""
    return dataset.with_transform(_load_images_transform) if dataset is not None else None


def get_dataset(
    path,
    processor,
    script_args,
    max_length: int | None,
    kind: str,
    load_images: bool = False,
    length_column: str = "length",
):
    """(datasets.Dataset, report) of one schema JSONL file; `kind` is the row kind the algorithm needs.

    SFT keeps image paths (the collator loads them) and gets each row's token length in `length_column` (the
    Trainer's `length_column_name`); DPO/GRPO get PIL images through a lazy transform.
    """
    from datasets import Dataset

    rows = load_rows(path, script_args.image_root, script_args.max_train_samples)
    if getattr(script_args, "answer_suffix", False):
        rows = [add_answer_suffix(row) for row in rows]
    kinds = Counter(row_kind(row) for row in rows)
    if set(kinds) != {kind}:
        raise SchemaError(f"{path}: {kind} rows expected, found {dict(kinds)}")
    # SFT rows get a `length` column for `train_sampling_strategy: group_by_length` (the Trainer reads
    # `length_column_name`; without it the Trainer would look for input_ids, and SFT rows are untokenised here).
    # Other kinds need lengths only to check max_length.
    needs_lengths = kind == "sft" or max_length is not None
    lengths = [token_length(row, processor) for row in rows] if needs_lengths else [0] * len(rows)
    rows, dropped, lengths = drop_long_rows(rows, lengths, max_length, path)
    dataset = Dataset.from_list(rows)
    if kind == "sft":
        if length_column in dataset.column_names:
            raise SchemaError(
                f"{path}: rows already have a {length_column!r} field, the column SFT fills with each row's token "
                "length for group_by_length; rename that field or set length_column_name to another name"
            )
        dataset = dataset.add_column(length_column, lengths)
    if load_images:
        dataset = lazy_images(dataset)
    report = {"file": str(path), "rows": len(rows) + dropped, "kept": len(rows), "dropped_too_long": dropped}
    logger.info("data %s", report)
    return dataset, report


def get_datasets(
    script_args, processor, max_length, kind: str, load_images: bool = False, length_column: str = "length"
):
    train, train_report = get_dataset(
        script_args.train_file, processor, script_args, max_length, kind, load_images, length_column
    )
    report = {"train": train_report}
    evaluation = None
    if script_args.eval_file:
        evaluation, report["eval"] = get_dataset(
            script_args.eval_file, processor, script_args, max_length, kind, load_images, length_column
        )
    return train, evaluation, report


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, strict resume, fallback past a corrupt last checkpoint
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoint_problem(path: Path) -> str | None:
    """None if the checkpoint directory is complete and readable, else the reason."""
    from safetensors import safe_open

    if not (path / COMPLETE_MARKER).is_file():
        return "no completion marker (the write was interrupted)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__})"
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights and not list(path.glob("global_step*")):
        return "no model weights"
    for file in path.glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
            return f"{file.name} unreadable ({type(e).__name__}: {e})"
    for file in [*path.glob("*.pt"), *path.glob("*.pth"), *path.glob("*.bin")]:
        try:
            with zipfile.ZipFile(file) as z:  # torch.save files are zip archives: a cut file has no directory
                z.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{file.name} unreadable ({type(e).__name__})"
    return None


def find_checkpoint(output_dir: str | Path, requested: str | None = None) -> str | None:
    """The checkpoint to resume from: `requested` (a path) if given, else the newest valid one in output_dir.

    A newer checkpoint that is incomplete or corrupt is skipped with a warning naming it and the reason.
    """
    if requested is not None and str(requested).lower() in NO_RESUME:
        return None
    if requested not in (None, "", "latest", "true", "True"):
        problem = checkpoint_problem(Path(requested))
        if problem:
            raise ValueError(f"cannot resume from {requested}: {problem}")
        return str(requested)
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted(
        (
            p
            for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if p.is_dir() and p.name.split("-")[-1].isdigit()
        ),
        key=_checkpoint_step,
        reverse=True,
    )
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("checkpoint %s is unusable (%s); falling back to an earlier checkpoint", path, problem)
    return None


class CheckpointMixin:
    """Mixed into TRL's trainers: atomic checkpoint directories and strict weight loading on resume, and the
    projector's own learning rate (`projector_lr`, LLaVA's mm_projector_lr: transformers' Trainer has one rate)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "projector_lr", None)
        if lr is None or getattr(self, "_projector_groups", False):
            return optimizer
        model = self.model if model is None else model
        projector = {id(p) for n, p in model.named_parameters() if PROJECTOR_MODULE in n}
        groups = []
        for group in optimizer.param_groups:  # each Trainer group (decay / no decay) split in two
            rest = [p for p in group["params"] if id(p) not in projector]
            own = [p for p in group["params"] if id(p) in projector]
            groups += [{**group, "params": ps, "lr": r} for ps, r in ((rest, group["lr"]), (own, lr)) if ps]
        optimizer.param_groups.clear()  # no step taken yet: there is no per-parameter state to move
        for group in groups:
            optimizer.add_param_group(group)
        self._projector_groups = True
        logger.info("projector learning rate %g (others %g)", lr, self.args.learning_rate)
        return optimizer

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        output_dir = self.args.output_dir
        # The Trainer writes checkpoint-N under args.output_dir: point it at the staging area for this one write.
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = Path(staging_root) / name, Path(run_dir) / name
            (staged / COMPLETE_MARKER).write_text(f"step {self.state.global_step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        full_weights = any(
            (Path(resume_from_checkpoint) / f).is_file()
            for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if not full_weights or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(
                resume_from_checkpoint, model
            )  # PEFT adapters load correctly
        # from_pretrained maps the legacy key layout of the saved checkpoint back to the module names.
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        logger.info("resumed weights from %s (strict)", resume_from_checkpoint)


def with_checkpointing(trainer_cls):
    """A subclass of `trainer_cls` with CheckpointMixin (one per TRL trainer, created on demand)."""
    return type(f"Med{trainer_cls.__name__}", (CheckpointMixin, trainer_cls), {})


def resume_checkpoint(training_args) -> str | None:
    checkpoint = find_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Train and save
# ---------------------------------------------------------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MallocTrimCallback(TrainerCallback):
    """After a step that leaves the process above `limit_gib` resident, hand glibc's free heap pages back.

    Why by hand: mk/malloc.mk keeps freed memory (no page faults for the next step's activations), but with
    batches of very different lengths the kept heap fragments and grows step after step (docs/train.md: 24 GiB at
    step 138 of a length-grouped stage 3). glibc's malloc_trim(0) returns every free page, not just the heap's
    top; the next step faults its pages in again, so this only runs above the limit. No-op outside glibc.
    """

    def __init__(self, limit_gib: float):
        import ctypes
        import ctypes.util

        self.limit = int(limit_gib * 2**30)
        self.trims = 0
        try:
            self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
            logger.warning("malloc_trim is not available (not glibc): malloc_trim_gib has no effect")

    def on_step_end(self, args, state, control, **kwargs):
        rss = resident_bytes()
        if self._trim is None or rss <= self.limit:
            return
        self._trim(0)
        self.trims += 1
        logger.info(
            "step %d: resident %.1f GiB > %.1f GiB, malloc_trim -> %.1f GiB",
            state.global_step,
            rss / 2**30,
            self.limit / 2**30,
            resident_bytes() / 2**30,
        )


def train_and_save(trainer, script_args, training_args, processor, report: dict) -> dict:
    """Train (resuming if a checkpoint exists), then save the final model, the loss curve and a report."""
    trim = None
    if script_args.malloc_trim_gib:
        trim = MallocTrimCallback(script_args.malloc_trim_gib)
        trainer.add_callback(trim)
    checkpoint = resume_checkpoint(training_args)
    report = {**report, "trainable": count_trainable(trainer.model)}
    result = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.accelerator.state
    report = {
        **report,
        "resumed_from": checkpoint,
        "malloc_trims": trim.trims if trim else None,
        "metrics": result.metrics,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "zero_stage": state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None,
        "log_history": trainer.state.log_history,
    }
    save_final(trainer, script_args, training_args, processor, report)
    return report


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
