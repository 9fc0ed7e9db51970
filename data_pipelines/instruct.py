"""Stage 2 (instruction) data: caption + inline mentions -> a multi-turn conversation about the image, written by
any OpenAI-compatible chat endpoint; also converts LLaVA-Med's released instruct JSON.

Usage:
    # generate (any /v1/chat/completions server: ours, vLLM, llama.cpp, a hosted API)
    python -m data_pipelines.instruct generate --input data/stage1/train.jsonl --output data/stage2/train.jsonl \\
        --base-url http://127.0.0.1:8000/v1 --model medllava --workers 4
    # convert llava_med_instruct_60k*.json (id, image, conversations from human/gpt with <image>)
    python -m data_pipelines.instruct convert --input llava_med_instruct_60k_inline_mention.json \\
        --image-root pmc_images --output data/stage2/train.jsonl

`generate` reads JSON/JSONL records with an image (`image`, `image_file` or a schema row's `images`), a caption
(`caption`, `fig_caption`, or a stage-1 schema row's answer) and optional inline mentions (`mentions` or
`in_text_mention`: strings or {"tokens": ...}). Base URL, model and key come from --base-url / --model /
--api-key or OPENAI_BASE_URL / OPENAI_MODEL / OPENAI_API_KEY. Requests run concurrently (--workers); the openai
client retries 429/5xx/timeouts with exponential backoff (--retries); every finished response is stored in an
on-disk cache keyed by the SHA-256 of the request (--cache, default OUTPUT.cache/), so a rerun after a kill
sends only the requests that had not finished. Token usage (from each response's `usage`) is summed and printed.
Replies are parsed into user/assistant turns; unparseable replies and conversations that leak the source text
("the caption", "figure legend", "as described in the text" ...) are rejected with reasons into
OUTPUT.rejected.jsonl. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.common import (
    Rejects,
    llava_to_messages,
    load_json_records,
    progress,
    unique_id,
    write_rows,
)
from medllava.schema import content_text, conversation, row_kind, validate_structure, vqa_answer, write_json

# ---------------------------------------------------------------------------------------------------------------
# Prompt: our own system prompt and few-shot examples
# ---------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You write training conversations for a medical imaging assistant.
You receive the caption of a figure from a biomedical article and, sometimes, sentences from the article that \
refer to the figure. You cannot see the image, but the conversation you write must read as if the assistant is \
looking at it.

Write a conversation between a User, who shows the image and asks about it, and an Assistant, who answers from \
what is visible. Rules:
- Ask about things the image itself would show: imaging modality or stain, body region and view, visible \
structures, abnormal findings, their location, size, number and appearance, and what they may suggest.
- Answer only what the caption and the sentences support; when something cannot be told from the image, say \
so plainly instead of inventing detail.
- Never mention the caption, the legend, the article, the text or the authors. The Assistant speaks about \
"the image", as someone examining it.
- Write 2 to 4 exchanges. Questions are short; answers are one to four sentences.
- Use exactly this format, each turn starting on a new line:
User: <question>
Assistant: <answer>"""

FEW_SHOT = (
    {
        "caption": "Axial contrast-enhanced CT of the abdomen showing a 4 cm hypodense lesion in the right hepatic "
        "lobe with peripheral nodular enhancement (arrow).",
        "mentions": [
            "The lesion's discontinuous peripheral enhancement pattern was typical of a haemangioma."
        ],
        "conversation": "User: What kind of scan is this?\n"
        "Assistant: This is an axial CT image of the abdomen acquired after intravenous contrast.\n"
        "User: Is anything abnormal in the liver?\n"
        "Assistant: Yes. There is a rounded low-density lesion in the right lobe of the liver, about 4 cm across, "
        "marked by an arrow.\n"
        "User: How does it enhance?\n"
        "Assistant: Its rim enhances in a patchy, nodular way while the centre stays darker. That peripheral "
        "nodular pattern is typical of a haemangioma, a benign vascular lesion.",
    },
    {
        "caption": "H&E stained section (x200) of the lymph node biopsy: sheets of large atypical lymphoid cells "
        "effacing the normal nodal architecture.",
        "mentions": [],
        "conversation": "User: What am I looking at?\n"
        "Assistant: This is a microscopic tissue section stained with haematoxylin and eosin, taken from a lymph "
        "node biopsy at medium magnification.\n"
        "User: Does the node look normal?\n"
        "Assistant: No. The usual organisation of the node is lost, replaced by sheets of large, atypical "
        "lymphoid cells.\n"
        "User: What could explain that?\n"
        "Assistant: Effacement of the architecture by large atypical lymphoid cells raises concern for a "
        "lymphoma. Immunohistochemistry would be needed to classify it; the image alone cannot.",
    },
)


def format_source(caption: str, mentions: list[str]) -> str:
    text = f"Figure caption:\n{caption.strip()}"
    if mentions:
        text += "\n\nSentences referring to the figure:\n" + "\n".join(f"- {m.strip()}" for m in mentions)
    return text


def build_messages(caption: str, mentions: list[str], few_shot: bool = True) -> list[dict]:
    """System prompt, few-shot pairs, then this figure (plain-string contents: every server accepts them)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example in FEW_SHOT if few_shot else ():
        messages.append({"role": "user", "content": format_source(example["caption"], example["mentions"])})
        messages.append({"role": "assistant", "content": example["conversation"]})
    messages.append({"role": "user", "content": format_source(caption, mentions)})
    return messages


def request_key(body: dict) -> str:
    """The cache key: SHA-256 of the canonical JSON request body (model, messages, sampling)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Parsing and filtering replies
# ---------------------------------------------------------------------------------------------------------------

_USER_LABELS = ("user", "human", "question", "q", "patient", "clinician", "doctor")
_ASSISTANT_LABELS = ("assistant", "gpt", "ai", "answer", "a", "bot")
_LABEL_RE = re.compile(
    r"^\s*(?:[-*>#]+\s*|\d+[.)]\s*)?[*_]{0,2}\s*("
    + "|".join(_USER_LABELS + _ASSISTANT_LABELS)
    + r")\s*[*_]{0,2}"
    r"\s*[:：]\s*[*_]{0,2}\s*",
    re.IGNORECASE,
)


def parse_conversation(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """A reply 'User: ...\\nAssistant: ...' -> ([(question, answer), ...], None) or ([], reason).

    Tolerates preamble text, markdown bold, list markers, multi-line turns, other role labels
    (Human/GPT, Q/A, Question/Answer); merges consecutive turns of one role; drops a final unanswered
    question (a reply cut by max_tokens).
    """
    if not isinstance(text, str) or not text.strip():
        return [], "empty reply"
    turns: list[list[str]] = []  # [role, text]
    for line in text.replace("\r\n", "\n").split("\n"):
        match = _LABEL_RE.match(line)
        if match:
            role = "user" if match.group(1).lower() in _USER_LABELS else "assistant"
            rest = line[match.end() :].strip().rstrip("*_").strip()
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + rest
            else:
                turns.append([role, rest])
        elif turns:
            turns[-1][1] += "\n" + line
    if not turns:
        return [], "no 'User:' / 'Assistant:' turns found in the reply"
    if turns[0][0] != "user":
        return [], "the reply starts with an assistant turn"
    if turns[-1][0] == "user":
        turns.pop()
    pairs = []
    for i in range(0, len(turns) - 1, 2):
        question = re.sub(r"\s*<image>\s*", " ", turns[i][1]).strip()
        answer = re.sub(r"\s*<image>\s*", " ", turns[i + 1][1]).strip()
        if not question or not answer:
            return [], f"empty {'question' if not question else 'answer'} in exchange {i // 2 + 1}"
        pairs.append((question, answer))
    if not pairs:
        return [], "no complete question/answer exchange in the reply"
    return pairs, None


# Phrases that reveal the conversation was written from text rather than from looking at the image.
LEAK_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bcaptions?\b",
        r"\bfigure legends?\b",
        r"\b(?:the|this) legend\b",
        r"\bas (?:described|mentioned|stated|noted|reported) in the (?:text|article|paper|study|description)\b",
        r"\baccording to the (?:text|article|paper|description|authors?|report)\b",
        r"\b(?:the|this) (?:text|article|paper) (?:says|states|mentions|describes|reports)\b",
        r"\bin-?text mentions?\b",
        r"\bsentences? (?:referring|that refer)\b",
        r"\bthe authors?\b",
        r"\b(?:I|we) (?:cannot|can't|can not|do not|don't) see the image\b",
    )
)


def repetition_problem(pairs: list[tuple[str, str]]) -> str | None:
    """A reason if a question is asked twice (small models loop on one exchange); None otherwise."""
    seen = Counter(re.sub(r"\W+", " ", q).strip().lower() for q, _ in pairs)
    question, n = seen.most_common(1)[0] if seen else ("", 0)
    return f"repetitive reply: the question {question[:60]!r} is asked {n} times" if n > 1 else None


def leak_problem(pairs: list[tuple[str, str]]) -> str | None:
    """The first caption-leaking phrase in the conversation, as a reason; None if clean."""
    for i, (question, answer) in enumerate(pairs, start=1):
        for role, text in (("question", question), ("answer", answer)):
            for pattern in LEAK_PATTERNS:
                match = pattern.search(text)
                if match:
                    return f"leaks the source text: {match.group(0)!r} in {role} {i}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading items
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    image: str  # as written in the source (relative to the image root)
    caption: str
    mentions: list[str] = field(default_factory=list)


def _mention_text(m) -> str | None:
    if isinstance(m, str):
        return m.strip() or None
    if isinstance(m, dict):
        value = m.get("tokens", m.get("text", m.get("sentence")))
        if isinstance(value, list):
            value = " ".join(map(str, value))
        return value.strip() if isinstance(value, str) and value.strip() else None
    return None


def item_from_record(record: dict, index: int) -> tuple[Item | None, str | None]:
    """A source record (figure-caption record or stage-1 schema row) -> (Item, None) or (None, reason)."""
    if not isinstance(record, dict):
        return None, "record is not an object"
    image = record.get("image") or record.get("image_file") or record.get("image_path")
    if not image and isinstance(record.get("images"), list) and len(record["images"]) == 1:
        image = record["images"][0]
    if not isinstance(image, str) or not image.strip():
        return None, "no single image path (image / image_file / images)"
    caption = record.get("caption") or record.get("fig_caption")
    if caption is None and "messages" in record:
        try:
            caption = vqa_answer(record) if row_kind(record) == "sft" else None
        except (ValueError, KeyError, TypeError):
            caption = None
    if not isinstance(caption, str) or not caption.strip():
        return None, "no caption (caption / fig_caption / the answer of a stage-1 row)"
    raw = record.get("mentions", record.get("in_text_mention")) or []
    raw = [raw] if isinstance(raw, (str, dict)) else raw
    mentions = [t for t in (_mention_text(m) for m in raw) if t]
    item_id = str(record.get("id") or record.get("pair_id") or index)
    return Item(item_id, image, caption.strip(), mentions), None


# ---------------------------------------------------------------------------------------------------------------
# Cache and client
# ---------------------------------------------------------------------------------------------------------------


class ResponseCache:
    """One JSON file per finished request, named by its key; written atomically so a kill never corrupts it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (
            json.JSONDecodeError
        ):  # cannot happen with atomic writes, but a hand-edited file is re-requested
            return None

    def put(self, key: str, response: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(response, f, ensure_ascii=False)
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*/*.json"))


def make_client(base_url: str | None, api_key: str | None, timeout: float, retries: int):
    """The openai client: it already retries 408/409/429/5xx, connection errors and timeouts with exponential
    backoff (and honours Retry-After), so we do not re-implement that."""
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=retries)


@dataclass
class Usage:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    counts: Counter = field(default_factory=Counter)

    def add(self, response: dict, cached: bool) -> None:
        usage = response.get("usage") or {}
        prefix = "cached_" if cached else ""
        with self.lock:
            self.counts[prefix + "requests"] += 1
            self.counts[prefix + "prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.counts[prefix + "completion_tokens"] += int(usage.get("completion_tokens") or 0)


def complete(client, cache: ResponseCache, body: dict, usage: Usage) -> dict:
    """The response for a request body: from the cache, or from the endpoint (then cached)."""
    key = request_key(body)
    response = cache.get(key)
    if response is not None:
        usage.add(response, cached=True)
        return response
    response = client.chat.completions.create(**body).model_dump(mode="json")
    cache.put(key, response)
    usage.add(response, cached=False)
    return response


def reply_text(response: dict) -> tuple[str | None, str | None]:
    """(text, finish_reason) of the first choice."""
    choices = response.get("choices") or []
    if not choices:
        return None, None
    msg = choices[0].get("message") or {}
    return msg.get("content"), choices[0].get("finish_reason")


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def to_row(item: Item, pairs: list[tuple[str, str]], image_path: str, model: str) -> dict:
    return {
        "id": f"instruct-{item.id}",
        "images": [image_path],
        "messages": conversation(pairs, n_images=1),
        "source": "instruct",
        "generator": model,
    }


def row_image_path(image: str, image_root: Path, out_dir: Path) -> str:
    path = Path(image) if Path(image).is_absolute() else image_root / image
    return os.path.relpath(path.absolute(), out_dir.absolute())


def cmd_generate(args) -> int:
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    model = args.model or os.environ.get("OPENAI_MODEL")
    if not model:
        print("error: no model: pass --model or set OPENAI_MODEL", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    image_root = args.image_root or args.input.parent
    out_dir = args.output.parent
    try:
        records = load_json_records(args.input)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rejects = Rejects()
    items = []
    for i, record in enumerate(records):
        item, problem = item_from_record(record, i)
        if item is not None and not args.no_image_check:
            path = Path(item.image) if Path(item.image).is_absolute() else image_root / item.image
            problem = None if path.is_file() else f"image not found: {path}"
        if problem:
            rejects.add(f"{args.input}[{i}]", problem, record)
        else:
            items.append(item)
    if args.limit is not None:
        items = items[: args.limit]

    cache = ResponseCache(args.cache or args.output.with_name(args.output.name + ".cache"))
    client = make_client(base_url, api_key, args.timeout, args.retries)
    usage = Usage()
    bodies = [
        {
            "model": model,
            "messages": build_messages(it.caption, it.mentions, not args.no_few_shot),
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            **({"seed": args.seed} if args.seed is not None else {}),
        }
        for it in items
    ]
    responses: list[dict | None] = [None] * len(items)
    failures = 0
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(complete, client, cache, body, usage): i for i, body in enumerate(bodies)}
        for future in progress(as_completed(futures), "instruct", total=len(futures), unit="req"):
            i = futures[future]
            try:
                responses[i] = future.result()
            except Exception as e:  # noqa: BLE001 - any client error fails this item only; reported below
                failures += 1
                rejects.add(
                    f"item {items[i].id}",
                    f"request failed after {args.retries} retries: {type(e).__name__}: {str(e)[:300]}",
                    {"id": items[i].id, "image": items[i].image},
                )

    rows, seen, outcome = [], Counter(), Counter()
    for item, response in zip(items, responses, strict=True):
        if response is None:
            continue
        text, finish = reply_text(response)
        pairs, problem = parse_conversation(text or "")
        problem = problem or repetition_problem(pairs)
        if problem is None and not args.no_leak_filter:
            problem = leak_problem(pairs)
        if problem is not None:
            outcome["leaked" if problem.startswith("leaks") else "unparseable"] += 1  # repetitive counts here
            rejects.add(
                f"item {item.id}",
                problem,
                {"id": item.id, "image": item.image, "reply": text, "finish_reason": finish},
            )
            continue
        row = to_row(item, pairs, row_image_path(item.image, image_root, out_dir), model)
        row["id"] = unique_id(row["id"], seen)
        problems = validate_structure(row)
        if problems:
            rejects.add(f"item {item.id}", problems, row)
            continue
        outcome["turns"] += len(pairs)
        rows.append(row)
    c = usage.counts
    stats = {
        "items": len(items),
        "rows": len(rows),
        "rejected": len(rejects),
        "failed_requests": failures,
        "unparseable": outcome["unparseable"],
        "leaked": outcome["leaked"],
        "new_requests": c["requests"],
        "cached_requests": c["cached_requests"],
        "prompt_tokens": c["prompt_tokens"],
        "completion_tokens": c["completion_tokens"],
        "cached_prompt_tokens": c["cached_prompt_tokens"],
        "cached_completion_tokens": c["cached_completion_tokens"],
        "mean_exchanges": round(outcome["turns"] / len(rows), 2) if rows else 0.0,
        "model": model,
        "base_url": base_url,
    }
    write_json(args.output.with_name(args.output.name + ".stats.json"), stats)
    write_rows(
        args.output,
        rows,
        rejects,
        [
            "items",
            "rows",
            "new req",
            "cached req",
            "failed",
            "unparseable",
            "leaked",
            "prompt tok (new)",
            "completion tok (new)",
            "exchanges/row",
        ],
        [
            len(items),
            len(rows),
            c["requests"],
            c["cached_requests"],
            failures,
            outcome["unparseable"],
            outcome["leaked"],
            c["prompt_tokens"],
            c["completion_tokens"],
            stats["mean_exchanges"],
        ],
    )
    if failures:
        print(f"{failures} request(s) failed; rerun the same command to retry only those", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    """LLaVA-Med's llava_med_instruct_60k*.json (LLaVA `conversations` layout) -> schema rows."""
    image_root = args.image_root or args.input.parent
    try:
        records = load_json_records(args.input)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, rejects, seen = [], Rejects(), Counter()
    leaked = 0
    for i, record in enumerate(progress(records, "convert")):
        where = f"{args.input}[{i}]"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            rejects.add(where, "record needs a string 'image'", record)
            continue
        image = record["image"]
        path = Path(image) if Path(image).is_absolute() else image_root / image
        if not args.no_image_check and not path.is_file():
            rejects.add(where, f"image not found: {path}", record)
            continue
        messages, problems = llava_to_messages(record.get("conversations"), 1)
        if not problems and not args.no_leak_filter:
            pairs = [
                (content_text(q["content"]), content_text(a["content"]))
                for q, a in zip(messages[::2], messages[1::2], strict=False)
            ]
            problem = leak_problem(pairs)
            if problem:
                leaked += 1
                problems = [problem]
        row = {
            "id": f"{args.source}-{record.get('id', i)}",
            "images": [row_image_path(image, image_root, args.output.parent)],
            "messages": messages,
            "source": args.source,
        }
        problems = problems or validate_structure(row)
        if problems:
            rejects.add(where, problems, record)
            continue
        row["id"] = unique_id(row["id"], seen)
        rows.append(row)
    turns = sum(len(r["messages"]) // 2 for r in rows)
    write_rows(
        args.output,
        rows,
        rejects,
        ["input records", "rows written", "rejected", "leaked", "exchanges/row"],
        [len(records), len(rows), len(rejects), leaked, f"{turns / max(len(rows), 1):.2f}"],
    )
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="caption + mentions -> conversation through a chat endpoint")
    gen.add_argument("--input", required=True, type=Path, help="JSON/JSONL of figure-caption records")
    gen.add_argument("--output", required=True, type=Path, help="schema JSONL to write")
    gen.add_argument("--image-root", type=Path, default=None, help="default: the input's directory")
    gen.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1 (env OPENAI_BASE_URL)")
    gen.add_argument("--model", default=None, help="model name sent to the endpoint (env OPENAI_MODEL)")
    gen.add_argument("--api-key", default=None, help="env OPENAI_API_KEY; local servers accept any")
    gen.add_argument("--workers", type=int, default=4, help="concurrent requests")
    gen.add_argument("--retries", type=int, default=5, help="retries per request (exponential backoff)")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--max-tokens", type=int, default=512, help="completion tokens per request")
    gen.add_argument(
        "--seed", type=int, default=None, help="sampling seed sent to the endpoint (if supported)"
    )
    gen.add_argument(
        "--cache", type=Path, default=None, help="response cache directory (default OUTPUT.cache)"
    )
    gen.add_argument("--limit", type=int, default=None, help="only the first N items")
    gen.add_argument("--no-few-shot", action="store_true", help="send only the system prompt and the figure")
    gen.add_argument(
        "--no-leak-filter", action="store_true", help="keep conversations that mention the caption"
    )
    gen.add_argument("--no-image-check", action="store_true", help="do not require the image files to exist")
    gen.set_defaults(func=cmd_generate)
    conv = sub.add_parser("convert", help="LLaVA-Med llava_med_instruct_60k*.json -> schema JSONL")
    conv.add_argument("--input", required=True, type=Path)
    conv.add_argument("--output", required=True, type=Path)
    conv.add_argument("--image-root", type=Path, default=None, help="default: the input's directory")
    conv.add_argument("--source", default="llava_med_instruct")
    conv.add_argument("--no-leak-filter", action="store_true")
    conv.add_argument("--no-image-check", action="store_true")
    conv.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
