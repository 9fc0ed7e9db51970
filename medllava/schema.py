"""The one data schema (TRL's conversational form) in code: row builders, accessors, validation and JSONL I/O.

Every data source becomes JSON lines of this shape; training, evaluation and serving read nothing else:

    {"id": "vqa_rad-00042", "images": ["images/synpic100.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
     "answer_type": "CLOSED", "question_type": "PRES", "modality": "CT", "source": "vqa_rad"}

- `images`: paths relative to an image root (by default the JSONL file's own directory); one `{"type": "image"}`
  placeholder per image in the messages.
- `messages`: an optional leading system turn, then user/assistant alternating, starting with user.
- For VQA the question is the last user turn's text, the ground truth the last assistant turn's text.
- GRPO prompt rows carry `prompt` (messages without the answer) and a verifiable `solution`;
  DPO rows carry `prompt`, `chosen` and `rejected` (TRL's conversational preference format).

    from medllava.schema import read_jsonl, write_jsonl, validate_row, make_vqa_row, vqa_question, vqa_answer
    for line_no, row in read_jsonl("train.jsonl"):
        problems = validate_row(row, image_root="data/vqa_rad")   # [] when the row is valid

Validation functions are pure: they return a list of human-readable reasons and never raise on bad rows.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

ANSWER_TYPES = ("OPEN", "CLOSED", "CHOICE")
OPEN, CLOSED, CHOICE = ANSWER_TYPES
ROLES = ("system", "user", "assistant")
ROW_KINDS = ("sft", "grpo", "dpo")
YES_NO = ("yes", "no")
# A literal image token in text would add image tokens that have no picture behind them.
_IMAGE_TOKEN_RE = re.compile(r"<image>", re.IGNORECASE)


class SchemaError(ValueError):
    """A JSONL file cannot be read as schema rows; the message names the file and line."""


# ---------------------------------------------------------------------------------------------------------------
# Builders and accessors
# ---------------------------------------------------------------------------------------------------------------


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part() -> dict:
    return {"type": "image"}


def message(role: str, text: str, n_images: int = 0) -> dict:
    """A turn in the schema: image placeholders first, then the text."""
    return {"role": role, "content": [image_part() for _ in range(n_images)] + [text_part(text)]}


def conversation(
    turns: Sequence[tuple[str, str]], n_images: int = 1, system: str | None = None
) -> list[dict]:
    """[(user text, assistant text), ...] -> messages; the images go in the first user turn."""
    messages = [message("system", system)] if system else []
    for i, (question, answer) in enumerate(turns):
        messages.append(message("user", question, n_images if i == 0 else 0))
        messages.append(message("assistant", answer))
    return messages


def make_vqa_row(
    row_id: str,
    images: Sequence[str],
    question: str,
    answer: str,
    answer_type: str | None = None,
    **metadata: Any,
) -> dict:
    """A single-turn VQA row; metadata with value None is left out (e.g. question_type, modality, source)."""
    row = {"id": row_id, "images": list(images), "messages": conversation([(question, answer)], len(images))}
    if answer_type is not None:
        row["answer_type"] = answer_type
    row.update({k: v for k, v in metadata.items() if v is not None})
    return row


def content_text(content) -> str:
    """Text of a message's content (a string or a list of parts): the one content-to-text helper."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")


def _last_text(messages: Sequence[dict], role: str) -> str:
    for m in reversed(messages):
        if m.get("role") == role:
            return content_text(m.get("content", "")).strip()
    raise ValueError(f"no {role} turn in the messages")


def row_messages(row: dict) -> list[dict]:
    """The conversation of any row kind (for DPO: prompt + chosen; for GRPO: the prompt)."""
    kind = row_kind(row)
    if kind == "sft":
        return list(row["messages"])
    if kind == "grpo":
        return list(row["prompt"])
    return list(row["prompt"]) + list(row["chosen"])


def vqa_question(row: dict) -> str:
    """The question: the last user turn's text (works for SFT, GRPO and DPO rows)."""
    return _last_text(row["prompt"] if "prompt" in row else row["messages"], "user")


def vqa_answer(row: dict) -> str:
    """The ground truth: the last assistant turn's text (GRPO rows: `solution`; DPO rows: the chosen answer)."""
    if "solution" in row:
        return str(row["solution"]).strip()
    if "chosen" in row:
        return _last_text(row["chosen"], "assistant")
    return _last_text(row["messages"], "assistant")


def prompt_messages(row: dict) -> list[dict]:
    """The messages up to (not including) the last assistant turn: what a model is asked."""
    if "prompt" in row:
        return list(row["prompt"])
    messages = list(row["messages"])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    return messages


def infer_answer_type(answer: str) -> str:
    """The answer type of a row that does not state one: CLOSED for a yes/no answer ("Yes.", "(no)"), CHOICE for a
    bare option letter ("B", "(c)", "D."), else OPEN. Data converters, eval and the GRPO rewards all use this."""
    text = str(answer).strip()
    if re.sub(r"^\W+|\W+$", "", text.lower()) in YES_NO:
        return CLOSED
    return CHOICE if re.fullmatch(r"\(?[A-Za-z]\)?\.?", text) else OPEN


def normalise_text(text: str) -> str:
    return re.sub(r"[\s.!,;:]+$", "", str(text).strip().lower())


def normalise_answer_type(value: Any) -> str | None:
    """'closed', 'Closed-ended', 'OPEN ' ... -> 'CLOSED' / 'OPEN' / 'CHOICE'; None if unrecognised or empty."""
    if value is None:
        return None
    text = str(value).strip().upper().replace("-ENDED", "").replace(" ENDED", "")
    aliases = {"YES/NO": CLOSED, "YESNO": CLOSED, "MC": CHOICE, "MULTIPLE CHOICE": CHOICE, "MCQ": CHOICE}
    text = aliases.get(text, text)
    return text if text in ANSWER_TYPES else None


def row_kind(row: dict) -> str:
    """'dpo' (prompt/chosen/rejected), 'grpo' (prompt/solution) or 'sft' (messages)."""
    if "chosen" in row or "rejected" in row:
        return "dpo"
    if "prompt" in row:
        return "grpo"
    return "sft"


# ---------------------------------------------------------------------------------------------------------------
# Validation: pure functions returning reasons
# ---------------------------------------------------------------------------------------------------------------


def validate_content(content: Any, where: str) -> tuple[list[str], int, str]:
    """(problems, image placeholders, text) of one message's content."""
    if isinstance(content, str):
        problems = (
            [f"{where}: literal <image> in text (use an image part)"]
            if _IMAGE_TOKEN_RE.search(content)
            else []
        )
        return problems, 0, content
    if not isinstance(content, list):
        return [f"{where}: content must be a string or a list of parts, got {type(content).__name__}"], 0, ""
    problems, n_images, texts = [], 0, []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            problems.append(f"{where} part {j}: not an object")
            continue
        kind = part.get("type")
        if kind == "image":
            n_images += 1
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                problems.append(f"{where} part {j}: text part without a string 'text'")
                continue
            if _IMAGE_TOKEN_RE.search(text):
                problems.append(f"{where} part {j}: literal <image> in text (use an image part)")
            texts.append(text)
        else:
            problems.append(f"{where} part {j}: unknown part type {kind!r} (expected 'image' or 'text')")
    return problems, n_images, "".join(texts)


def validate_messages(
    messages: Any, field: str = "messages", final_role: str | None = "assistant", first_role: str = "user"
) -> tuple[list[str], int]:
    """(problems, image placeholders) of a message list: roles, alternation, empty turns, content parts.

    `final_role` is the role the list must end with (None: any); `first_role` the first non-system role.
    """
    if not isinstance(messages, list) or not messages:
        return [f"{field}: must be a non-empty list"], 0
    problems, n_images, expected = [], 0, first_role
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: not an object")
            continue
        role = m.get("role")
        if role not in ROLES:
            problems.append(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            continue
        if role == "system":
            if i != 0:
                problems.append(f"{where}: a system turn is only allowed first")
        elif role != expected:
            problems.append(f"{where}: role {role!r} where {expected!r} was expected (roles must alternate)")
            expected = role  # resynchronise so one slip is reported once
        if role != "system":
            expected = "assistant" if role == "user" else "user"
        content_problems, n, text = validate_content(m.get("content"), where)
        problems.extend(content_problems)
        if n and role != "user":
            problems.append(f"{where}: image placeholder in a {role} turn (images belong to user turns)")
        if not text.strip() and not n and not content_problems:
            problems.append(f"{where}: empty {role} turn")
        n_images += n
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if final_role and last != final_role:
        problems.append(f"{field}: ends with a {last!r} turn, expected {final_role!r}")
    return problems, n_images


def validate_structure(row: Any) -> list[str]:
    """Everything that can be checked without touching the disk or a tokenizer."""
    if not isinstance(row, dict):
        return [f"row is a {type(row).__name__}, not a JSON object"]
    problems = []
    row_id = row.get("id")
    if not isinstance(row_id, str) or not row_id.strip():
        problems.append("id: missing or not a non-empty string")
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
        problems.append("images: must be a list of non-empty path strings")
        images = []
    kind = row_kind(row)
    if kind == "sft":
        found, n_images = validate_messages(row.get("messages"))
        problems += found
    elif kind == "grpo":
        found, n_images = validate_messages(row.get("prompt"), "prompt", final_role="user")
        problems += found
        if not isinstance(row.get("solution"), str) or not row["solution"].strip():
            problems.append("solution: a GRPO prompt row needs a non-empty string solution")
    else:
        found, n_images = validate_messages(row.get("prompt"), "prompt", final_role="user")
        problems += found
        for field in ("chosen", "rejected"):
            found, n = validate_messages(
                row.get(field), field, final_role="assistant", first_role="assistant"
            )
            problems += found
            if n:
                problems.append(f"{field}: image placeholders are only allowed in the prompt")
        if (
            isinstance(row.get("chosen"), list)
            and isinstance(row.get("rejected"), list)
            and json.dumps(row["chosen"], sort_keys=True) == json.dumps(row["rejected"], sort_keys=True)
        ):
            problems.append("chosen and rejected are identical")
    if n_images != len(images):
        problems.append(f"{n_images} image placeholder(s) in the messages but {len(images)} image(s) listed")
    if "answer_type" in row and row["answer_type"] not in ANSWER_TYPES:
        problems.append(f"answer_type: {row['answer_type']!r} is not one of {', '.join(ANSWER_TYPES)}")
    return problems


def resolve_image(path: str, image_root: str | Path | None) -> Path:
    """An image path of a row as a filesystem path (absolute paths are kept as they are)."""
    p = Path(path)
    return p if p.is_absolute() or image_root is None else Path(image_root) / p


@lru_cache(maxsize=65536)
def _image_problem_cached(path: str, mtime_ns: int, size: int) -> str | None:
    from medllava.processing import ImageLoadError, load_image

    try:
        load_image(path)
    except ImageLoadError as e:
        return f"image does not decode: {e}"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reason to reject the row, reported as such
        return f"image does not decode: {path}: {type(e).__name__}: {e}"
    return None


def image_problem(path: str | Path, decode: bool = True) -> str | None:
    """None if the image exists (and decodes, via medllava.processing.load_image), else the reason."""
    p = Path(path)
    if not p.is_file():
        return f"image not found: {p}"
    if not decode:
        return None
    stat = p.stat()
    return _image_problem_cached(str(p), stat.st_mtime_ns, stat.st_size)


def token_length(row: dict, processor) -> int:
    """Tokens of the longest full conversation in the row, after image expansion."""
    from medllava.processing import count_tokens

    kind = row_kind(row)
    if kind == "sft":
        return count_tokens(processor, {"messages": row["messages"]})
    if kind == "grpo":
        return count_tokens(processor, {"messages": row["prompt"] + [message("assistant", row["solution"])]})
    return max(count_tokens(processor, {"messages": row["prompt"] + row[k]}) for k in ("chosen", "rejected"))


def validate_row(
    row: Any,
    image_root: str | Path | None = None,
    processor=None,
    max_tokens: int | None = None,
    check_images: bool = True,
    decode_images: bool = True,
) -> list[str]:
    """All reasons this row is not a valid schema row ([] when it is).

    Checks the structure; with `check_images`, that each image exists under `image_root` and (with
    `decode_images`) decodes; with a `processor` and `max_tokens`, that the conversation fits in `max_tokens`.
    """
    problems = validate_structure(row)
    if not isinstance(row, dict):
        return problems
    images = row.get("images", [])
    if check_images and isinstance(images, list):
        for path in images:
            if isinstance(path, str) and path.strip():
                problem = image_problem(resolve_image(path, image_root), decode=decode_images)
                if problem:
                    problems.append(problem)
    if processor is not None and max_tokens is not None and not problems:
        n = token_length(row, processor)
        if n > max_tokens:
            problems.append(f"{n} tokens > max {max_tokens} (image tokens are never truncated)")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# JSONL I/O
# ---------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object raises SchemaError
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise SchemaError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def read_valid_rows(
    path: str | Path,
    image_root: str | Path | None = None,
    require_images: bool = False,
    limit: int | None = None,
) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each row of a schema file, structurally validated, with its image paths resolved
    against `image_root` (default: the file's own directory). The one reader train and eval use.

    A row that is not valid (or, with `require_images`, names an image that is not a file) raises SchemaError
    naming the file, the line and every reason: fix the data, do not skip it.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    n = 0
    for line_no, row in read_jsonl(path):
        if limit is not None and n >= limit:
            return
        problems = validate_structure(row)
        images = [resolve_image(p, root) for p in row.get("images") or []] if not problems else []
        if require_images:
            problems += [f"image not found: {p}" for p in images if not p.is_file()]
        if problems:
            raise SchemaError(f"{path}:{line_no}: {'; '.join(problems)}")
        n += 1
        yield line_no, {**row, "images": [str(p) for p in images]}


def read_rows(path: str | Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically (temp file + rename, so a kill never leaves half a file); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Write a JSON document atomically (reports, summaries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
