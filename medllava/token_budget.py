"""A token budget for rows with many images: fewer tokens per image by pooling the projected patch tokens.

A Llava hands the LLM every patch token of every image: at 168 px that is 144 tokens an image, so a 24-slice
volume would be 3,456 tokens before a word of text. Past a budget of image tokens per row, each image of the row
gets a smaller square grid: its projected patch tokens (after the projector, before the LLM) are average-pooled
from the tower's side x side grid to the largest side' x side' that keeps n_images x side'^2 within the budget.
Rows within the budget are untouched, so single images and pairs see exactly what they did before.

Two halves, both needed, because transformers' Llava expands every `<image>` to the same number of tokens:
- `shrink_rows` (called by `medllava.processing.encode`) cuts each over-budget row's image-token blocks to
  side'^2 tokens and re-pads the batch;
- `enable_pooling(model)` makes the model pool each image's features to the length of its block of image tokens,
  read from `input_ids` (each image is a separate run of image tokens: the chat template writes `<image>\n`).
A checkpoint is unchanged by either (no weights, no config), so any Llava tool still loads it; such a tool just
does not pool, which matters only for rows over the budget. Hand-written because transformers' Llava has no
per-image token count (LLaVA-OneVision pools video frames only, with a fixed factor); the measurement behind
the default budget is in docs/inputs.md ("Token budget").
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

# Image tokens a row may carry before its images are pooled: 8 unpooled images at 168 px (12 x 12 patches),
# 18 at 112 px. Past it, side' shrinks; below MIN_SIDE a row is refused (see docs/inputs.md, "Token budget").
DEFAULT_BUDGET = 1152
MIN_SIDE = 3


class TokenBudgetError(ValueError):
    """A row has more images than the token budget can hold even at MIN_SIDE x MIN_SIDE tokens each."""


def pooled_side(n_images: int, side: int, budget: int = DEFAULT_BUDGET, min_side: int = MIN_SIDE) -> int:
    """The grid side each of a row's n_images images gets: `side` within the budget, else the largest smaller
    side s with n_images * s^2 <= budget. Raises TokenBudgetError below min_side."""
    if n_images <= 0 or n_images * side * side <= budget:
        return side
    s = math.isqrt(budget // n_images)
    if s < min(min_side, side):
        raise TokenBudgetError(
            f"{n_images} images need at least {n_images * min_side**2} image tokens at {min_side}x{min_side} "
            f"each, over the budget of {budget}: send fewer images (at most {budget // min_side**2})"
        )
    return min(s, side)


def shrink_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    full: int,
    keeps: list[int],
    pad_id: int,
    padding_side: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every row's image-token blocks (`full` tokens an image, as the processor expanded them) to
    keeps[row] tokens, then re-pad the batch. Rows keeping `full` keep their ids."""
    rows = []
    for ids, mask, keep in zip(input_ids.tolist(), attention_mask.tolist(), keeps, strict=True):
        ids = [t for t, m in zip(ids, mask, strict=True) if m]
        if keep < full:
            out, run = [], 0
            for t in ids:
                if t == image_token_id:
                    # the k-th token of its image's block: drop those past `keep`
                    if run % full < keep:
                        out.append(t)
                    run += 1
                else:
                    out.append(t)
            if run % full:
                raise ValueError(f"{run} image tokens in a row are not whole images of {full} tokens")
            ids = out
        rows.append(ids)
    length = max(len(r) for r in rows)
    new_ids = torch.full((len(rows), length), pad_id, dtype=input_ids.dtype)
    new_mask = torch.zeros((len(rows), length), dtype=attention_mask.dtype)
    for i, ids in enumerate(rows):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        new_ids[i, span] = torch.tensor(ids, dtype=input_ids.dtype)
        new_mask[i, span] = 1
    return new_ids, new_mask


def image_runs(input_ids: torch.Tensor, image_token_id: int, full: int) -> list[int]:
    """Tokens per image, in the order the images' features are placed: the runs of image tokens row by row. A run
    of k * full tokens is k unpooled images written next to each other; any other length must be a square
    (one pooled image)."""
    counts = []
    for ids in input_ids.tolist():
        run = 0
        for t in [*ids, None]:
            if t == image_token_id:
                run += 1
                continue
            if run:
                if run % full == 0:
                    counts.extend([full] * (run // full))
                elif math.isqrt(run) ** 2 == run:
                    counts.append(run)
                else:
                    raise ValueError(
                        f"a run of {run} image tokens is neither whole images of {full} tokens nor one pooled "
                        "square grid: pooled images must be separated by text (the chat template writes "
                        "'<image>\\n')"
                    )
            run = 0
    return counts


def pool_tokens(features: torch.Tensor, side: int) -> torch.Tensor:
    """(..., side_in^2, D) patch tokens of one image or a batch of them -> (..., side^2, D), average-pooled on the
    patch grid (row-major patches, as the tower emits them)."""
    *lead, n, dim = features.shape
    side_in = math.isqrt(n)
    if side_in * side_in != n:
        raise ValueError(f"{n} image tokens are not a square grid: only grid features can be pooled")
    if side == side_in:
        return features
    grid = features.transpose(-1, -2).reshape(-1, dim, side_in, side_in)
    return F.adaptive_avg_pool2d(grid, side).reshape(*lead, dim, side * side).transpose(-1, -2)


def _pooled(features: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    if len(counts) != len(features):
        raise ValueError(f"{len(counts)} images in the text but {len(features)} images' features")
    return [
        pool_tokens(f, math.isqrt(c)) if c != f.shape[0] else f for f, c in zip(features, counts, strict=True)
    ]


def enable_pooling(model) -> None:
    """Make a LlavaForConditionalGeneration (or its LlavaModel) pool each image's projected tokens to the length
    of the image's run of image tokens in `input_ids`. Idempotent; without short runs nothing changes.

    A forward pre-hook on the LlavaModel, which is where `input_ids` and the image features meet: given pixels, it
    encodes them itself and passes the pooled features as `mm_encoder_outputs`; given features (transformers'
    `generate` encodes images before the prefill), it pools those."""
    inner = getattr(model, "model", model)
    if getattr(inner, "_medllava_pooling", False):
        return
    image_token_id = model.config.image_token_id
    signature = inspect.signature(inner.forward)

    def pool_before_forward(module, args, kwargs):
        if args:
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments) | kwargs.get("kwargs", {})
            kwargs.pop("kwargs", None)
        input_ids, pixel_values = kwargs.get("input_ids"), kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if input_ids is None or (pixel_values is None and encoded is None):
            return None
        # "full" strategy keeps the CLS token, which is not on the grid: such models are never pooled
        if module.config.vision_feature_select_strategy != "default":
            return None
        if pixel_values is not None:
            patch = module.config.vision_config.patch_size
            full = (pixel_values.shape[-1] // patch) * (pixel_values.shape[-2] // patch)
        else:
            full = max(f.shape[0] for f in encoded.pooler_output)
        counts = image_runs(input_ids, image_token_id, full)
        if all(c == full for c in counts):
            return ((), kwargs) if args else None
        if encoded is None:
            encoded = module.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
            kwargs["pixel_values"] = None
        encoded.pooler_output = _pooled(list(encoded.pooler_output), counts)
        kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        return (), kwargs

    inner.register_forward_pre_hook(pool_before_forward, with_kwargs=True)
    inner._medllava_pooling = True
