"""Prompt building and answer extraction: the one home of what train, eval, serve and the GRPO rewards ask and read.

    from medllava.prompts import ANSWER_SUFFIXES, with_suffix, add_answer_suffix, extract_answer
    with_suffix(messages, ANSWER_SUFFIXES["CLOSED"])     # "... Is there a mass? Answer yes or no."
    add_answer_suffix(row)                               # the same instruction on each user turn of a training row
    extract_answer("<think>..</think><answer>no</answer>")   # "no"

- Answer-type instructions (`ANSWER_SUFFIXES`): appended to a VQA question by eval (and by training with
  `answer_suffix: true`, so a model is trained on exactly what it is asked at evaluation).
- The answer format (`FORMAT_SYSTEM_PROMPT`, `is_answer_format`): `<think>...</think><answer>...</answer>`, asked
  for by GRPO's system prompt and checked by its `format` reward.
- Answer extraction (`extract_answer`, `extract_choice`): what every metric scores, so a tagged completion is
  scored on its answer alone, and a closed answer that states its finding first ("This is an MRI of the head.
  No.", built by `stated_answer`) on its verdict.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

from medllava.schema import content_text

ANSWER_SUFFIXES = {
    "CLOSED": "Answer yes or no.",
    "OPEN": "Answer with a short phrase.",
    "CHOICE": "Answer with the letter of the correct option.",
}

# The system prompt that asks for the format the GRPO `format` reward checks (train/grpo.py adds it to prompts).
FORMAT_SYSTEM_PROMPT = (
    "You are MedLLaVA, a research assistant that answers questions about medical images. You may think first "
    "inside <think> </think>; then give the final short answer inside <answer> </answer>."
)
_FORMAT = re.compile(r"^\s*(?:<think>.*?</think>\s*)?<answer>.+?</answer>\s*$", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# A closed answer that states the finding first ends with the verdict as a sentence of its own.
_VERDICT = re.compile(r"[.!?:;]\s+(yes|no)[.!]?$", re.IGNORECASE)
# A letter standing alone at the start ("B", "(B)", "B. xxx", "B) xxx", "B: xxx"), or after "answer"/"option".
_CHOICE_PATTERNS = (
    re.compile(r"^\(([a-z])\)"),
    re.compile(r"^([a-z])(?:[.):]|\s*$)"),
    re.compile(r"\b(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*\(?([a-z])\)?(?![a-z0-9])"),
)


# ---------------------------------------------------------------------------------------------------------------
# Building prompts
# ---------------------------------------------------------------------------------------------------------------


def edit_last_user_text(messages: list[dict], edit: Callable[[str], str], missing: str) -> list[dict]:
    """A copy of the messages with the last user turn's (last) text replaced by edit(text), or `missing` added as
    a text part if that turn has none."""
    messages = copy.deepcopy(list(messages))
    last_user = next(m for m in reversed(messages) if m.get("role") == "user")
    content = last_user["content"]
    if isinstance(content, str):
        last_user["content"] = edit(content)
        return messages
    texts = [p for p in content if p.get("type") == "text"]
    if texts:
        texts[-1]["text"] = edit(texts[-1]["text"])
    else:
        content.append({"type": "text", "text": missing})
    return messages


def with_suffix(messages: list[dict], suffix: str) -> list[dict]:
    """A copy of the messages with `suffix` appended to the last user turn's text."""
    if not suffix:
        return messages
    return edit_last_user_text(messages, lambda text: f"{text.rstrip()} {suffix}", suffix)


def with_prefix(messages: list[dict], prefix: str) -> list[dict]:
    """A copy of the messages with `prefix` put before the last user turn's text."""
    return edit_last_user_text(messages, lambda text: f"{prefix} {text}", prefix)


def add_answer_suffix(row: dict, suffixes: dict[str, str] = ANSWER_SUFFIXES) -> dict:
    """The row with the instruction for its answer type appended to its last user turn (once). Rows merged by
    data_pipelines.group_turns carry `answer_types`, one per user turn: every turn gets its own instruction."""
    key = "messages" if "messages" in row else "prompt"
    if key not in row:
        return row
    users = [i for i, m in enumerate(row[key]) if m.get("role") == "user"]
    types = row.get("answer_types")
    if not isinstance(types, list) or len(types) != len(users):
        types = [None] * (len(users) - 1) + [row.get("answer_type")] if users else []
    messages = list(row[key])
    for i, answer_type in zip(users, types, strict=True):
        suffix = suffixes.get(answer_type)
        if suffix and not content_text(messages[i]["content"]).rstrip().endswith(suffix):
            messages[i] = with_suffix([messages[i]], suffix)[0]
    return {**row, key: messages} if messages != row[key] else row


# ---------------------------------------------------------------------------------------------------------------
# Reading answers
# ---------------------------------------------------------------------------------------------------------------


def is_answer_format(text: str) -> bool:
    """True when the text is `<answer>...</answer>`, optionally preceded by `<think>...</think>`."""
    return bool(_FORMAT.match(text))


def stated_answer(statement: str, verdict: str) -> str:
    """A closed answer that says what it sees before the verdict: ("This is an MRI of the head", "no") ->
    "This is an MRI of the head. No." (`extract_answer` gives back "No")."""
    if verdict.strip().lower() not in ("yes", "no"):
        raise ValueError(f"a verdict is yes or no, not {verdict!r}")
    return f"{statement.strip().rstrip('.')}. {verdict.strip().capitalize()}."


def split_stated(text: str) -> tuple[str, str] | None:
    """(statement, verdict) of a stated-finding closed answer ("This is a CT. No." -> ("This is a CT", "No")), or
    None when the text is not one."""
    text = "" if text is None else str(text).strip()
    verdict = None if _ANSWER_TAG.search(text) else _VERDICT.search(text)
    if not verdict:
        return None
    return text[: verdict.start()].rstrip(" .!?:;"), verdict.group(1)


def extract_answer(text: str) -> str:
    """The final answer of a reply, which is what every metric scores:
    - the content of the first `<answer>...</answer>` if there is one;
    - else the verdict of a stated-finding closed answer ("This is a CT of the chest. No." -> "No");
    - else the whole text (stripped)."""
    text = "" if text is None else str(text)
    match = _ANSWER_TAG.search(text)
    if match:
        return match.group(1).strip()
    text = text.strip()
    verdict = _VERDICT.search(text)
    return verdict.group(1) if verdict else text


def extract_choice(text: str) -> str | None:
    """The option letter of a multiple-choice answer ("B", "(b)", "B. Pneumonia", "answer: b") in upper case."""
    text = extract_answer(text).lower()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None
