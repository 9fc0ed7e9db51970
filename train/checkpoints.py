"""Checkpoints: atomic writes, strict resume, and a fallback past an incomplete or corrupt last checkpoint.

transformers' Trainer writes `checkpoint-N/` in place, and on resume loads a full model's weights non-strictly: a
Llava checkpoint is saved in the legacy key layout (`language_model.model.layers.*`), nothing matches, and training
silently continues from the initial weights (transformers only logs the missing and unexpected keys; the resumed
losses then differ from an uninterrupted run's). `CheckpointMixin` fixes both: a checkpoint is written to a staging
directory and renamed into place when complete, and resuming loads the weights through `from_pretrained` (which
maps the legacy keys) and then `load_state_dict(strict=True)`. `find_checkpoint` skips an incomplete or corrupt
last checkpoint with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from train.configs import NO_RESUME

logger = logging.getLogger("medllava.train")
STAGING_DIR = ".staging"
COMPLETE_MARKER = ".complete"


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
        # torch.save files are zip archives: a file cut short has no central directory
        try:
            with zipfile.ZipFile(file) as z:
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


def resume_checkpoint(training_args) -> str | None:
    """find_checkpoint for a run's output_dir and resume_from_checkpoint, logged."""
    checkpoint = find_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


class CheckpointMixin:
    """Mixed into TRL's trainers: atomic checkpoint directories and strict weight loading on resume."""

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
            # PEFT adapters load correctly through the Trainer
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # from_pretrained maps the legacy key layout of the saved checkpoint back to the module names.
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        logger.info("resumed weights from %s (strict)", resume_from_checkpoint)
