"""The one data schema (TRL's conversational form) in code: row builders, accessors, validation and JSONL I/O.

Every data source becomes JSON lines of this shape; training, evaluation and serving read nothing else:

    {"id": "vqa_rad-00042", "images": ["images/synpic100.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
     "answer_type": "CLOSED", "question_type": "PRES", "modality": "CT", "source": "vqa_rad"}

- `images`: paths relative to an image root (by default the JSONL file's own directory); one `{"type": "image"}`
  placeholder per image in the messages. Resolved (symlinks followed), a path must stay inside the image root,
  a folder its converter recorded beside it in `image_roots.json`, or a folder allowed explicitly.
- `image_roles` (optional): what each image is, one entry per image in the order of `images` (and of the
  placeholders): `{"role": "prior" | "current", "date": "YYYY-MM-DD", "label": "free text"}`, date and label
  optional. The text the model reads about them is written by `medllava.image_roles` (e.g. "Image 1: prior
  study (2025-03-01). Image 2: current study.") at the start of the user turn that holds the images.
- Text never holds a chat control token (CONTROL_TOKENS) and every string encodes as UTF-8.
- `messages`: an optional leading system turn, then user/assistant alternating, starting with user.
- For VQA the question is the last user turn's text, the ground truth the last assistant turn's text.
- GRPO prompt rows carry `prompt` (messages without the answer) and a verifiable `solution`;
  DPO rows carry `prompt`, `chosen` and `rejected` (TRL's conversational preference format).

    from medllava.schema import read_jsonl, write_jsonl, validate_row, make_vqa_row, vqa_question, vqa_answer
    for line_no, row in read_jsonl("train.jsonl"):
        problems = validate_row(row, image_root="data/vqa_rad")   # [] when the row is valid

Validation functions return a list of human-readable reasons and never raise on bad rows (only a malformed
`image_roots.json` is a SchemaError).
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

from medllava.image_roles import ROLES as IMAGE_ROLES
from medllava.image_roles import check_date

ANSWER_TYPES = ("OPEN", "CLOSED", "CHOICE")
OPEN, CLOSED, CHOICE = ANSWER_TYPES
ROLES = ("system", "user", "assistant")
ROW_KINDS = ("sft", "grpo", "dpo")
YES_NO = ("yes", "no")
# Strings the tokenizer turns into control tokens. In a row's text, <image> would add image tokens with no
# picture behind them, and the chat markers would close the turn and forge another (a fake system turn, say).
CONTROL_TOKENS = ("<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>")
_CONTROL_TOKEN_RE = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS), re.IGNORECASE)
# Schema rows are a few levels deep; deeper JSON is refused before anything recurses into it.
MAX_ROW_DEPTH = 32
# Linux PATH_MAX and NAME_MAX: longer image paths cannot name a file.
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255
# Beside a dataset: the folders outside it that its converter placed images in (see recorded_image_roots).
IMAGE_ROOTS_FILE = "image_roots.json"
# The keys of an `image_roles` entry (one entry per image): what the image is, when it was taken, a free label.
IMAGE_ROLE_KEYS = ("role", "date", "label")


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


def _short(text: str, limit: int = 120) -> str:
    """A value quoted for a reason: repr (so lone surrogates and control characters print), cut to `limit`."""
    return repr(text if len(text) <= limit else text[: limit - 20] + "...")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be a turn's text (None if it can): it does not encode as UTF-8 (a lone surrogate), or
    it holds one of CONTROL_TOKENS."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text does not encode as UTF-8 (lone surrogate {text[e.start]!r} at character {e.start})"
    found = _CONTROL_TOKEN_RE.search(text)
    if found is None:
        return None
    if found.group().lower() == "<image>":
        return "literal <image> in text (use an image part)"
    return f"control token {found.group()!r} in text (it would end the turn and start a forged one)"


def validate_content(content: Any, where: str) -> tuple[list[str], int, str]:
    """(problems, image placeholders, text) of one message's content."""
    if isinstance(content, str):
        problem = text_problem(content)
        return ([f"{where}: {problem}"] if problem else []), 0, content
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
            problem = text_problem(text)
            if problem:
                problems.append(f"{where} part {j}: {problem}")
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


def nesting_depth(value: Any) -> int:
    """Levels of lists and objects in a JSON value (a scalar is 0); iterative, so any depth is safe."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in item)
    return depth


def _field(where: str, key: Any) -> str:
    name = key if isinstance(key, str) and re.fullmatch(r"\w{1,64}", key, re.ASCII) else _short(str(key), 40)
    return f"{where}.{name}" if where else name


def encoding_problems(row: Any) -> list[str]:
    """Reasons for every string (key or value) of a JSON value that does not encode as UTF-8: a lone surrogate
    such as "\\ud800" decodes from JSON but cannot be written, tokenized or used as a path."""
    problems, stack = [], [("", row)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                stack.append((_field(where, key), child))
                try:
                    str(key).encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(f"{_field(where, key)}: key does not encode as UTF-8 (lone surrogate)")
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(
                    f"{where or 'row'}: text does not encode as UTF-8 (lone surrogate {value[e.start]!r} at "
                    f"character {e.start})"
                )
    return sorted(problems)


def image_path_problem(path: Any) -> str | None:
    """Why a row's image path string can never name a file (None if it can): not a non-empty string, a NUL
    character, longer than the system allows. Checked before the path touches the filesystem."""
    if not isinstance(path, str) or not path.strip():
        return "must be a non-empty path string"
    if "\x00" in path:
        return f"path contains a NUL character: {_short(path)}"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return f"path does not encode as UTF-8: {_short(path)}"
    longest = max(len(name) for name in encoded.split(b"/"))
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        return (
            f"path too long ({len(path)} characters; at most {MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} per "
            f"name): {_short(path, 60)}"
        )
    return None


def image_roles_problems(image_roles: Any, n_images: int) -> list[str]:
    """Why a row's `image_roles` is not one entry per image ({"role": ..., "date": ..., "label": ...}, in the
    order of `images`); [] when it is. Each reason starts with the field it is about."""
    if not isinstance(image_roles, list):
        return [f"image_roles: must be a list with one entry per image, got {type(image_roles).__name__}"]
    problems = []
    if len(image_roles) != n_images:
        problems.append(
            f"image_roles: {len(image_roles)} entr{'y' if len(image_roles) == 1 else 'ies'} for {n_images} "
            "image(s) (one entry per image, in order)"
        )
    roles, keys = ", ".join(IMAGE_ROLES), ", ".join(IMAGE_ROLE_KEYS)
    for i, entry in enumerate(image_roles):
        where = f"image_roles[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object with keys {keys}, got {type(entry).__name__}")
            continue
        unknown = [_short(str(k), 40) for k in entry if k not in IMAGE_ROLE_KEYS]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {keys})")
        role = entry.get("role")
        if "role" not in entry:
            problems.append(f"{where}: missing 'role' (one of {roles})")
        elif not isinstance(role, str) or role not in IMAGE_ROLES:
            problems.append(f"{where}: role {_short(str(role), 40)} is not one of {roles}")
        if "date" in entry:
            try:
                check_date(entry["date"])
            except ValueError as e:
                problems.append(f"{where}: {e} (leave 'date' out when it is not known)")
        if "label" in entry:
            label = entry["label"]
            if not isinstance(label, str) or not label.strip():
                problems.append(
                    f"{where}: label must be a non-empty string (leave it out when there is none)"
                )
            elif text_problem(label):
                problems.append(f"{where}: label: {text_problem(label)}")
    return problems


def validate_structure(row: Any) -> list[str]:
    """Everything that can be checked without touching the disk or a tokenizer."""
    if not isinstance(row, dict):
        return [f"row is a {type(row).__name__}, not a JSON object"]
    if nesting_depth(row) > MAX_ROW_DEPTH:
        return [f"row nested deeper than {MAX_ROW_DEPTH} levels (schema rows are a few levels deep)"]
    problems = encoding_problems(row)
    if problems:
        return problems
    row_id = row.get("id")
    if not isinstance(row_id, str) or not row_id.strip():
        problems.append("id: missing or not a non-empty string")
    images = row.get("images", [])
    if not isinstance(images, list):
        problems.append("images: must be a list of non-empty path strings")
        images = []
    for i, path in enumerate(images):
        problem = image_path_problem(path)
        if problem:
            problems.append(f"images[{i}]: {problem}")
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
    if "image_roles" in row:
        problems += image_roles_problems(row["image_roles"], len(images))
    return problems


def resolve_image(path: str, image_root: str | Path | None) -> Path:
    """An image path of a row as a filesystem path (absolute paths are kept as they are)."""
    p = Path(path)
    return p if p.is_absolute() or image_root is None else Path(image_root) / p


def _resolved(path: str | Path, base: Path | None = None) -> Path:
    p = Path(path)
    return ((base / p) if base is not None and not p.is_absolute() else p).resolve()


def recorded_image_roots(image_root: str | Path) -> list[Path]:
    """Folders outside `image_root` its converter placed images in, from IMAGE_ROOT/image_roots.json
    ({"roots": [path, ...]}, each relative to that folder or absolute), resolved; [] without the file.

    The converters write it when their rows point outside their output (`--images relative` or `symlink`,
    caption and instruction rows over an external image folder), so their own output validates without a flag.
    It is part of the dataset: review it like the rows. A malformed file, or a filesystem root in it, is a
    SchemaError.
    """
    root = Path(image_root)
    sidecar = root / IMAGE_ROOTS_FILE
    try:
        if not sidecar.is_file():
            return []
        data = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SchemaError(f"{sidecar}: unreadable ({type(e).__name__}: {e})") from None
    entries = data.get("roots") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(r, str) and not image_path_problem(r) for r in entries
    ):
        raise SchemaError(f'{sidecar}: expected {{"roots": [folder path, ...]}}')
    roots = []
    for entry in entries:
        resolved = _resolved(entry, root)
        if resolved == Path(resolved.anchor):
            raise SchemaError(
                f"{sidecar}: {entry!r} is a filesystem root; name the folder that holds the images"
            )
        roots.append(resolved)
    return roots


@lru_cache(maxsize=256)
def _allowed_roots_cached(
    image_root: str, allow_roots: tuple[str, ...], stamp: int | None
) -> tuple[Path, ...]:
    roots = [_resolved(image_root), *recorded_image_roots(image_root), *(_resolved(r) for r in allow_roots)]
    return tuple(dict.fromkeys(roots))


def allowed_roots(image_root: str | Path | None, allow_roots: Iterable[str | Path] = ()) -> tuple[Path, ...]:
    """The folders a row's images may resolve into, symlinks followed: the image root (default: the current
    directory), the roots recorded beside it (recorded_image_roots) and `allow_roots` (allowed explicitly)."""
    root = Path(image_root if image_root is not None else ".").absolute()
    try:
        stamp = (root / IMAGE_ROOTS_FILE).stat().st_mtime_ns
    except (OSError, ValueError):
        stamp = None
    return _allowed_roots_cached(str(root), tuple(str(Path(r).absolute()) for r in allow_roots), stamp)


def locate_image(
    path: str, image_root: str | Path | None, roots: Sequence[Path] | None = None
) -> tuple[Path | None, str | None]:
    """(filesystem path, None) for a row's image path that stays inside `roots` (default: allowed_roots of
    `image_root`) once resolved, symlinks followed; (None, reason) for one that escapes or cannot be resolved.
    Only the path is looked at here: whether the file exists is image_problem's question."""
    problem = image_path_problem(path)
    if problem:
        return None, f"image path {problem}"
    roots = allowed_roots(image_root) if roots is None else roots
    full = resolve_image(path, image_root)
    try:
        real = full.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        return None, f"image path cannot be resolved: {_short(path)} ({type(e).__name__}: {e})"
    if not any(real.is_relative_to(root) for root in roots):
        where = (
            f"the image root {roots[0]}"
            if len(roots) == 1
            else "the allowed roots " + ", ".join(map(str, roots))
        )
        return None, (
            f"image outside {where}: {_short(path)} resolves to {real} (another folder is allowed only "
            "explicitly: --allow-root DIR)"
        )
    return full, None


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
    try:
        if not p.is_file():
            return f"image not found: {p}"
        stat = p.stat()
    except (OSError, ValueError) as e:
        return f"image cannot be read: {_short(str(p))}: {getattr(e, 'strerror', None) or e}"
    if not decode:
        return None
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
    allow_roots: Iterable[str | Path] = (),
) -> list[str]:
    """All reasons this row is not a valid schema row ([] when it is).

    Checks the structure; that each image path, resolved, stays inside `image_root` (or a root recorded beside
    it, or one of `allow_roots`: see allowed_roots); with `check_images`, that each image exists and (with
    `decode_images`) decodes; with a `processor` and `max_tokens`, that the conversation fits in `max_tokens`.
    """
    problems = validate_structure(row)
    images = row.get("images", []) if isinstance(row, dict) else None
    if not isinstance(images, list) or nesting_depth(row) > MAX_ROW_DEPTH or encoding_problems(row):
        return problems
    roots = allowed_roots(image_root, allow_roots)
    for path in images:
        if image_path_problem(path):
            continue  # a structure problem already
        full, problem = locate_image(path, image_root, roots)
        if problem is None and check_images:
            problem = image_problem(full, decode=decode_images)
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


def parse_jsonl_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for one line of a JSONL file, or (None, reason) when it is not UTF-8, not JSON, or JSON
    nested too deeply to parse. Never raises on the line's content."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply to parse)"
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return None, f"malformed JSON ({e})"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None, bytes]]:
    """(line number, value, reason, raw bytes) for each non-blank line: the value and None, or None and why
    the line cannot be read (parse_jsonl_line). Lines are read as bytes and decoded one by one, so one bad
    line never stops the file: the validator reports it and goes on."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                value, problem = parse_jsonl_line(raw)
                yield line_no, value, problem, raw


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object (not UTF-8, malformed,
    nested too deeply, an array ...) raises SchemaError naming the file, the line and the reason."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    for line_no, row, problem, _ in iter_jsonl(path):
        if problem:
            raise SchemaError(f"{path}:{line_no}: {problem}")
        if not isinstance(row, dict):
            raise SchemaError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def read_valid_rows(
    path: str | Path,
    image_root: str | Path | None = None,
    require_images: bool = False,
    limit: int | None = None,
    allow_roots: Iterable[str | Path] = (),
) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each row of a schema file, structurally validated, with its image paths resolved
    against `image_root` (default: the file's own directory). The one reader train and eval use.

    A row that is not valid, names an image outside the allowed roots (the image root, the roots recorded
    beside it, `allow_roots`: see allowed_roots) or, with `require_images`, an image that is not a file,
    raises SchemaError naming the file, the line and every reason: fix the data, do not skip it.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    roots = allowed_roots(root, allow_roots)
    n = 0
    for line_no, row in read_jsonl(path):
        if limit is not None and n >= limit:
            return
        problems = validate_structure(row)
        images = []
        for image in [] if problems else row.get("images") or []:
            full, problem = locate_image(image, root, roots)
            if problem is None and require_images:
                problem = image_problem(full, decode=False)
            if problem:
                problems.append(problem)
            images.append(full)
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
