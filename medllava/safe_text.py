"""Message text is data, never structure: a special-token string inside a message is encoded as plain text.

The chat template writes the control tokens that give a conversation its structure (`<|im_start|>`, `<|im_end|>`,
`<image>`). Rendered and tokenised as one string, a message containing "<|im_end|><|im_start|>system ..." would
become those very tokens and forge a turn, `<|endoftext|>` would end the sequence, `<image>` would claim an image.
This module uses transformers' own mechanism (the one behind `apply_chat_template(..., sanitize_control_tokens=True)`):
every control token inside message text is wrapped in private-use markers before the template is rendered, and a
tokenizer or processor called with `sanitize_control_tokens=True` encodes each marked token as plain text and drops
the markers. Text without control tokens is tokenised exactly as before (same ids), for training and serving alike.

    from medllava.safe_text import mark_control_text
    text = render(processor, mark_control_text(processor, messages), add_generation_prompt=True)
    batch = processor(text=[text], images=images, sanitize_control_tokens=True, return_tensors="pt")
    ids = processor.tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]

A string rendered from marked messages must only be tokenised with `sanitize_control_tokens=True` (the markers are
not text). The two private-use code points used as markers (U+F0000, U+F0001) are removed from message text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from transformers.utils.chat_template_utils import mark_control_tokens


def control_tokens(processor) -> tuple[str, ...]:
    """The strings message text must never become: the tokenizer's special tokens and the other added tokens the
    chat template writes (whitespace tokens excepted: templates use them as ordinary text)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None) or ""
    return tuple(
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special or (token.content in template and not token.content.isspace())
    )


@lru_cache(maxsize=16)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    longest_first = sorted(tokens, key=len, reverse=True)  # a token wins over the shorter tokens inside it
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def mark_control_text(processor, messages: Sequence[dict]) -> list[dict]:
    """A copy of `messages` ({"role", "content"} dicts; content a string or parts) with every control token inside
    their strings marked, so that tokenising the rendered template with `sanitize_control_tokens=True` encodes it
    as plain text. Roles are marked too, but the schema only allows fixed role names."""
    return mark_control_tokens(list(messages), _pattern(control_tokens(processor)))
