"""A patch of one private TRL function: score only the labelled positions in TRL's fused LM head on CPU too.

TRL computes the SFT and DPO losses through `trl.trainer.utils.add_fused_lm_head`, whose forward picks one of two
paths per batch with `compact = _use_triton(hidden_states.device)`. Compact, the LM head projects only the
positions whose next token carries a label; otherwise it projects every position (TRL's reason: fixed tile shapes,
so a compiled backend such as Neuron does not recompile on every batch). `_use_triton` is true on CUDA/XPU with
Triton only. The TRL 1.16.0 source this mirrors (the installed wheel: `trl/trainer/utils.py` line 1642 and
`trl/kernels/chunked_logprob.py` lines 48-49):
    https://github.com/huggingface/trl/blob/v1.16.0/trl/trainer/utils.py#L1640-L1660
    https://github.com/huggingface/trl/blob/v1.16.0/trl/kernels/chunked_logprob.py#L48-L49

Eager CPU has no compilation to protect, and in VQA training ~90% of positions (image, system prompt, questions)
carry no label: the LM head over SmolLM2's 49,152-token vocabulary is a fifth of a step's matrix work. Replacing
the name `_use_triton` in `trl.trainer.utils` (not in `trl.kernels`, whose kernels still choose Triton by device)
with a test that is also true on CPU gives the same loss and metrics; a grouped stage-3 step of the starter went
from 20.6 to 16.1 s (docs/train.md). TRL has no option for it, hence this patch (recipes: `lm_head_labelled_only`).

It is written for one TRL version, `WRITTEN_FOR_TRL` (pyproject.toml pins it). Any other version is left alone
with a warning, so TRL's own behaviour runs until someone has read that version's source and updated this file.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("medllava.train")

WRITTEN_FOR_TRL = "1.16.0"


def score_labelled_positions_only(enabled: bool = True) -> bool:
    """Make TRL's fused LM head project only labelled positions on CPU too (or, with `enabled=False`, put TRL's
    own test back). Returns whether labelled-only scoring is on. Idempotent."""
    import trl
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    original = getattr(current, "_medllava_original", current)
    if current is not original:
        # back to TRL's own test first: every path below either leaves it so or patches it again
        trl_utils._use_triton = original
    if not enabled:
        return False
    if trl.__version__ != WRITTEN_FOR_TRL:
        logger.warning(
            "lm_head_labelled_only: train/trl_lm_head_patch.py was written for trl %s, this is trl %s; the patch "
            "is off and TRL's own LM head path runs (on CPU every position is scored: same loss, slower). Read "
            "the new version's add_fused_lm_head, then update WRITTEN_FOR_TRL.",
            WRITTEN_FOR_TRL,
            trl.__version__,
        )
        return False
    if original is None or not hasattr(trl_utils, "add_fused_lm_head"):
        logger.warning(
            "lm_head_labelled_only: this TRL has no fused LM head test to switch; the patch is off"
        )
        return False

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    compact._medllava_original = original
    trl_utils._use_triton = compact
    return True
