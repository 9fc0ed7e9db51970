"""The run around a TRL trainer, shared by sft.py, dpo.py and grpo.py: logging, the trainer class (TRL's with
atomic checkpoints, strict resume and per-part learning rates), and train-then-save with resume."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from medllava.modeling import count_trainable
from train.checkpoints import CheckpointMixin, resume_checkpoint
from train.models import PartLRMixin
from train.saving import save_final

logger = logging.getLogger("medllava.train")


def setup_logging(training_args) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)


def trainer_class(trl_trainer):
    """`trl_trainer` (e.g. SFTTrainer) with CheckpointMixin and PartLRMixin, created on demand."""
    return type(f"Med{trl_trainer.__name__}", (CheckpointMixin, PartLRMixin, trl_trainer), {})


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
