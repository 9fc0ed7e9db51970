"""Asked "Describe this image.", does a model state the image's facts, and does any reply loop?

For each medsynth caption row (its `facts`: modality, region, lesion_count and, with lesions, side / position)
the model gets a chat: the image with `--prompt` ("Describe this image."), then the `--follow-up` questions
("How many lesions are there?") and, only for images with at least one lesion, the `--lesion-follow-up`
questions ("Where is the lesion?"), each asked in the same conversation after the model's own earlier replies.
Decoding is greedy, so runs are reproducible.

The description (the first reply) is scored per fact by word matching (`stated`, `score_facts`):
- a fact is a hit when the reply states its true value, synonyms allowed ("MR", "magnetic resonance" for MRI;
  "radiograph" for X-ray; "brain" for head; "no focal lesion" = 0, "a single nodule" = 1, "2 lesions" = 2);
- it is contradicted when the reply states another value of it (names another modality, region, count, side
  or upper/lower), whether or not it also states the true one;
- `position` (images with lesions only) is a hit when the reply names both the true side (left/right) and the
  true vertical half (upper/lower, top/bottom, superior/inferior), anywhere in the reply.
Recall is reported per fact, pooled over every (image, fact) pair, and as the mean per image, with the
contradiction rate, for all images and per modality. Size and contrast are not scored.

A reply loops (`is_looping`) when it stops at the token limit (no end-of-turn token) and its tail repeats a
word or character pattern of period 1-30 at least 3 times, or when it contains anywhere a run of one pattern
repeated at least 4 times ("the the the the", "ct-m-m-m-m"). Loops are counted over every reply of every turn.

Usage:
    python -m eval.diagnostics.describe --model default --output outputs/describe   # 100 captions_test rows
    python -m eval.diagnostics.describe --model outputs/starter/dpo \
        --data data/medsynth/captions_unseen.jsonl --output outputs/describe_unseen --limit 0   # every row
    python -m eval.diagnostics.describe --model default --output OUT --follow-up --lesion-follow-up   # 1 turn

Writes OUTPUT/describe.jsonl (one row per chat: every reply, finished flags, per-fact hit / contradiction,
looping), OUTPUT/describe.json (the summary) and OUTPUT/describe.md (the table it prints).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medllava.assets import resolve_model
from medllava.reports import markdown_table
from medllava.schema import SchemaError, message, read_valid_rows, write_json, write_jsonl

DEFAULT_PROMPT = "Describe this image."
DEFAULT_FOLLOW_UPS = ("How many lesions are there?",)
DEFAULT_LESION_FOLLOW_UPS = ("Where is the lesion?",)
FACTS = ("modality", "region", "lesion_count", "position")

# ------------------------------------------------------------------------------------------------------------
# What a reply states. The values are medsynth's (data_pipelines/medsynth/vocab.py: MODALITIES,
# MODALITY_ASKED, REGION_PHRASE, COUNT_WORDS, QUADRANTS); they are copied here, with common synonyms added,
# because eval/ may not import data_pipelines/ (tests/test_layering.py). Patterns match the lowercased reply.
# ------------------------------------------------------------------------------------------------------------

MODALITY_PATTERNS = {
    "CT": r"\bct\b|computed tomograph\w*|\bcat scan",
    "MRI": r"\bmri\b|\bmr\b|magnetic resonance",
    "X-ray": r"\bx[- ]?rays?\b|radiograph\w*|plain film",
    "ultrasound": r"ultrasound|ultrasonograph\w*|sonogra\w*|echocardiogra\w*",
    "nuclear medicine": r"nuclear medicine|nuclear (?:scan|imaging)|scintigra\w*|\bspect\b|\bpet\b|bone scan",
    "fundus photograph": r"fundus|fundoscop\w*|funduscop\w*|retinal (?:photo\w*|image)",
    "histology": r"histolog\w*|histopatholog\w*|microscop\w*|\bh&e\b|stained (?:tissue|section|slide)",
}
REGION_PATTERNS = {
    "head": r"(?<!femoral )(?<!humeral )\bhead\b|\bbrain\b|\bskull\b|cranial|cerebr\w*",
    "spine": r"\bspine\b|\bspinal\b|vertebra\w*|\blumbar\b",
    "abdomen": r"abdom\w*|\bliver\b|hepatic|\bkidneys?\b|\brenal\b|pancrea\w*|\bspleen\b|\bsplenic\b",
    "shoulder": r"shoulder|glenohumeral|humer\w*|rotator cuff|scapula\w*",
    "chest": r"\bchest\b|thorax|thoracic(?! spine| vertebra)|\blungs?\b|pulmonary",
    "leg": r"\blegs?\b|\bknee\b|\bfemur\b|femoral|\btibia\w*|\bfibula\w*|\bthigh\b|lower (?:limb|extremit)",
    "lymph node": r"\blymph\w*|\bnodal\b",
    "heart": r"\bheart\b|cardiac|echocardiogra\w*|myocard\w*|pericard\w*",
    "pelvis": r"pelvi[sc]|\buter\w*|\bbladder\b|\bovar\w*|prostat\w*",
    "whole body": r"(?:whole|full|entire|total)[- ]body",
    "eye": r"\beyes?\b|retina\w*|ocular|optic dis[ck]|macula\w*",
    "colon": r"\bcolon\w*|colorectal|large (?:intestine|bowel)|intestin\w*",
    "skin": r"\bskin\b|cutaneous|\bdermis\b|\bdermal\b|epiderm\w*",
}
_NOUN = (
    r"(?:lesions?|nodules?|mass(?:es)?|tumou?rs?|abnormalit(?:y|ies)|"
    r"foci|focus|spots?|cysts?|opacit(?:y|ies))"
)
_NOUN_END = r"(?![\w-])"  # "lesion-free" does not name a lesion
# words that may stand between a number and its noun ("three large bright focal lesions"), but not a word that
# ends the noun phrase ("one of the lesions", "a CT image of ...", "2 cm lesion")
_STOP = r"(?:of|the|a|an|and|or|in|on|at|with|than|is|are|no|not|this|that|these|those|image|scan|cm|mm)"
_GAP = rf"(?:(?!{_STOP}\b)[a-z-]+,?\s+){{0,4}}"
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = (
    {word: n for n, word in enumerate(_NUMBER_WORDS, start=1)}
    | {str(n): n for n in range(1, 11)}
    | {"a single": 1, "single": 1, "a": 1, "an": 1, "a pair of": 2}
)
_SEVERAL = ("multiple", "several", "numerous", "many", "a few")  # more than one, how many not said
MANY = 99  # stands for "more than one": {2, ..., MANY}
_COUNT = re.compile(
    r"(?<!than )(?<!least )(?<![\w-])("
    + "|".join(re.escape(w) for w in sorted([*_NUMBERS, *_SEVERAL], key=len, reverse=True))
    + rf")\s+{_GAP}{_NOUN}{_NOUN_END}"
)
_MORE = r"(?:other|further|additional|more|new)"  # "one lesion and no other lesions" does not say 0
_NONE = re.compile(
    r"(?:\b(?:no|zero|without(?:\s+any)?|free\s+of(?:\s+any)?)|(?:\bnot|n't|\bnever)\s+(?:\w+\s+){0,2}?any)"
    rf"\s+(?:(?!{_MORE}\b)[a-z-]+\s+){{0,2}}?{_NOUN}{_NOUN_END}"
)
# "left ventricle", "lower limb", "upper abdomen" name anatomy, not where in the picture a lesion is
_ANATOMY = (
    r"(?![- ](?:ventric|atri|lobe|kidney|lung|hemispher|breast|arm|leg|knee|shoulder|eye|hand|foot|hip|ovar|"
    r"thigh|limb|extremit|abdomen|body|back|jaw|wall|vena|border|heart))"
)
SIDE_PATTERNS = {"left": rf"\bleft\b{_ANATOMY}", "right": rf"\bright\b{_ANATOMY}"}
VERTICAL_PATTERNS = {
    "upper": rf"\b(?:upper|top|superior)\b{_ANATOMY}",
    "lower": rf"\b(?:lower|bottom|inferior)\b{_ANATOMY}",
}


def _found(patterns: dict[str, str], text: str) -> set[str]:
    return {value for value, pattern in patterns.items() if re.search(pattern, text)}


@dataclass
class Statements:
    """What a reply states: the values of each fact it names (a count as the set of counts it allows)."""

    modality: set[str] = field(default_factory=set)
    region: set[str] = field(default_factory=set)
    counts: list[frozenset[int]] = field(default_factory=list)
    side: set[str] = field(default_factory=set)
    vertical: set[str] = field(default_factory=set)


def stated(text: str) -> Statements:
    """The facts a reply names, found by word matching on the lowercased text."""
    text = " ".join(text.lower().split())
    counts = [frozenset({0})] if _NONE.search(text) else []
    for m in _COUNT.finditer(text):
        word = m.group(1)
        counts.append(frozenset(range(2, MANY + 1)) if word in _SEVERAL else frozenset({_NUMBERS[word]}))
    return Statements(
        modality=_found(MODALITY_PATTERNS, text),
        region=_found(REGION_PATTERNS, text),
        counts=counts,
        side=_found(SIDE_PATTERNS, text),
        vertical=_found(VERTICAL_PATTERNS, text),
    )


def fact_problem(facts) -> str | None:
    """Why a row's `facts` cannot be scored, or None."""
    if not isinstance(facts, dict):
        return "no 'facts' object (a medsynth caption row carries one)"
    if facts.get("modality") not in MODALITY_PATTERNS:
        return f"facts.modality {facts.get('modality')!r} is not one of {sorted(MODALITY_PATTERNS)}"
    if facts.get("region") not in REGION_PATTERNS:
        return f"facts.region {facts.get('region')!r} is not one of {sorted(REGION_PATTERNS)}"
    count = facts.get("lesion_count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return f"facts.lesion_count {count!r} is not a count"
    if count and (facts.get("side") not in SIDE_PATTERNS or facts.get("position") not in VERTICAL_PATTERNS):
        return "facts of an image with lesions need side (left/right) and position (upper/lower)"
    return None


def score_facts(text: str, facts: dict) -> dict[str, dict[str, bool]]:
    """{fact: {"hit", "contradicted"}} for each fact that applies (position: images with lesions only)."""
    s = stated(text)
    count = facts["lesion_count"]
    out = {
        "modality": {
            "hit": facts["modality"] in s.modality,
            "contradicted": bool(s.modality - {facts["modality"]}),
        },
        "region": {"hit": facts["region"] in s.region, "contradicted": bool(s.region - {facts["region"]})},
        "lesion_count": {
            "hit": frozenset({count}) in s.counts,
            "contradicted": any(count not in allowed for allowed in s.counts),
        },
    }
    if count:
        out["position"] = {
            "hit": facts["side"] in s.side and facts["position"] in s.vertical,
            "contradicted": bool(s.side - {facts["side"]} or s.vertical - {facts["position"]}),
        }
    return out


# ------------------------------------------------------------------------------------------------------------
# Looping
# ------------------------------------------------------------------------------------------------------------

MAX_PERIOD = 30
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _runs(seq, period: int):
    """(start, length) of each maximal stretch of `seq` with seq[i] == seq[i - period] (repeats of a unit)."""
    start = None
    for i in range(period, len(seq) + 1):
        if i < len(seq) and seq[i] == seq[i - period]:
            if start is None:
                start = i - period
        elif start is not None:
            yield start, i - start
            start = None


def is_looping(text: str, finished: bool) -> bool:
    """Whether a reply is degenerate repetition: a unit of 1-30 words (punctuation marks count as words, and
    the unit must hold a word) or of 1-30 characters (over 8 characters or more, the unit holding a letter)
    repeated at least 4 times in a row anywhere ("the the the the", "ct-m-m-m-m"); or, for a reply stopped at
    the token limit (`finished` False), such a unit repeated at least 3 times at its end, the last repeat
    possibly cut off (a character unit there: over 6 characters or more, holding anything but digits, so
    that "!!!!!!" counts and "..." or "10000" do not). A sentence that repeats a word ("two lesions; the
    lesions are small") is not a loop, nor are three repeats in a reply that ended by itself.
    """
    text = " ".join(text.lower().split())
    tokens = _TOKEN.findall(text)
    for period in range(1, MAX_PERIOD + 1):
        for start, length in _runs(tokens, period):
            if not any(t[0].isalnum() or t[0] == "_" for t in tokens[start : start + period]):
                continue
            at_end = start + length == len(tokens)
            if length >= 4 * period or (not finished and at_end and length >= 3 * period):
                return True
        for start, length in _runs(text, period):
            unit = text[start : start + period]
            if length >= 4 * period and length >= 8 and any(c.isalpha() for c in unit):
                return True
            at_end = start + length == len(text)
            tail = length >= 3 * period and length >= 6 and any(not (c.isdigit() or c == " ") for c in unit)
            if not finished and at_end and tail:
                return True
    return False


# ------------------------------------------------------------------------------------------------------------
# Chats
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Chat:
    id: str
    line: int
    image: str
    facts: dict
    questions: list[str]  # the prompt, then the follow-ups this image gets
    replies: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


def read_chats(
    data: Path, prompt: str, follow_ups: list[str], lesion_follow_ups: list[str], limit: int | None
) -> list[Chat]:
    """One chat per caption row; a row without scorable facts or whose image is missing raises SchemaError."""
    chats = []
    for line, row in read_valid_rows(data, require_images=True, limit=limit):
        where = f"{data}:{line} ({row['id']})"
        if len(row.get("images") or []) != 1:
            n = len(row.get("images") or [])
            raise SchemaError(f"{where}: a description needs exactly one image, the row has {n}")
        problem = fact_problem(row.get("facts"))
        if problem:
            raise SchemaError(f"{where}: {problem}")
        facts = row["facts"]
        questions = [prompt, *follow_ups, *(lesion_follow_ups if facts["lesion_count"] else [])]
        chats.append(Chat(row["id"], line, row["images"][0], facts, questions))
    if not chats:
        raise SchemaError(f"{data}: no rows")
    return chats


def _messages(chat: Chat, turn: int) -> list[dict]:
    """The conversation up to the user's question of `turn`, with the model's own earlier replies."""
    messages = []
    for i in range(turn + 1):
        messages.append(message("user", chat.questions[i], n_images=1 if i == 0 else 0))
        if i < turn:
            messages.append(message("assistant", chat.replies[i]))
    return messages


def run_chats(model, processor, chats: list[Chat], data: Path, batch_size: int, max_new_tokens: int) -> None:
    """Fill every chat's replies, a batch of chats at a time, each turn of a batch in one `generate` call."""
    from medllava.generation import generate
    from medllava.processing import ImageLoadError, load_image

    for start in tqdm(range(0, len(chats), batch_size), desc="chats", unit="batch"):
        batch = chats[start : start + batch_size]
        images = {}
        for chat in batch:
            try:
                images[chat.id] = load_image(chat.image)
            except ImageLoadError as e:
                raise SchemaError(f"{data}:{chat.line} ({chat.id}): {e}") from None
        for turn in range(max(len(c.questions) for c in batch)):
            asked = [c for c in batch if turn < len(c.questions)]
            examples = [{"images": [images[c.id]], "messages": _messages(c, turn)} for c in asked]
            completions = generate(
                model, processor, examples, images_loaded=True, max_new_tokens=max_new_tokens
            )
            for chat, completion in zip(asked, completions, strict=True):
                chat.replies.append(completion.text)
                chat.finished.append(completion.finish_reason == "stop")


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def chat_row(chat: Chat) -> dict:
    scores = score_facts(chat.replies[0], chat.facts)
    loops = [is_looping(r, f) for r, f in zip(chat.replies, chat.finished, strict=True)]
    return {
        "id": chat.id,
        "image": chat.image,
        "facts": chat.facts,
        "turns": [
            {"question": q, "reply": r, "finished": f, "looping": lp}
            for q, r, f, lp in zip(chat.questions, chat.replies, chat.finished, loops, strict=True)
        ],
        "scores": scores,
        "recall": sum(s["hit"] for s in scores.values()) / len(scores),
        "looping": any(loops),
    }


def _group(rows: list[dict]) -> dict:
    pairs = [s for r in rows for s in r["scores"].values()]
    replies = [t for r in rows for t in r["turns"]]
    out = {"chats": len(rows)}
    for fact in FACTS:
        scored = [r["scores"][fact] for r in rows if fact in r["scores"]]
        out[fact] = {
            "n": len(scored),
            "recall": sum(s["hit"] for s in scored) / len(scored) if scored else None,
            "contradicted": sum(s["contradicted"] for s in scored) / len(scored) if scored else None,
        }
    out["recall_pooled"] = sum(s["hit"] for s in pairs) / len(pairs)
    out["recall_mean_per_image"] = sum(r["recall"] for r in rows) / len(rows)
    out["contradiction_rate"] = sum(s["contradicted"] for s in pairs) / len(pairs)
    out["replies"] = len(replies)
    out["replies_at_limit"] = sum(not t["finished"] for t in replies)
    out["looping_replies"] = sum(t["looping"] for t in replies)
    out["looping_chats"] = sum(r["looping"] for r in rows)
    return out


def summarise(rows: list[dict]) -> dict:
    """Recall, contradictions and loops over every chat ("ALL") and per modality."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["facts"]["modality"]].append(r)
    return {"ALL": _group(rows)} | {m: _group(groups[m]) for m in sorted(groups)}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(summary: dict) -> str:
    headers = ["modality", "chats", "modality %", "region %", "count %", "position %"]
    headers += ["recall % (pooled)", "recall % (mean/image)", "contradicted %", "looping chats"]
    rows = [
        [
            key,
            g["chats"],
            *(_pct(g[fact]["recall"]) for fact in FACTS),
            _pct(g["recall_pooled"]),
            _pct(g["recall_mean_per_image"]),
            _pct(g["contradiction_rate"]),
            f"{g['looping_chats']} of {g['chats']}",
        ]
        for key, g in summary.items()
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    from medllava.generation import load

    parser = argparse.ArgumentParser(
        prog="python -m eval.diagnostics.describe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="default", help="'default' or a Llava directory")
    parser.add_argument("--data", type=Path, default=Path("data/medsynth/captions_test.jsonl"))
    parser.add_argument("--output", type=Path, required=True, help="directory for describe.{jsonl,json,md}")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the first question, asked with the image")
    parser.add_argument(
        "--follow-up",
        nargs="*",
        default=list(DEFAULT_FOLLOW_UPS),
        help="questions asked after the description, in the same chat (none: the flag alone)",
    )
    parser.add_argument(
        "--lesion-follow-up",
        nargs="*",
        default=list(DEFAULT_LESION_FOLLOW_UPS),
        help="questions asked last, only about images with at least one lesion (none: the flag alone)",
    )
    parser.add_argument("--limit", type=int, default=100, help="only the first N rows (0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="chats answered together")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.limit < 0:
        parser.error("--batch-size and --max-new-tokens must be >= 1, --limit >= 0")
    chats = read_chats(args.data, args.prompt, args.follow_up, args.lesion_follow_up, args.limit or None)
    model_dir = resolve_model(args.model)
    model, processor = load(str(model_dir))
    run_chats(model, processor, chats, args.data, args.batch_size, args.max_new_tokens)
    rows = [chat_row(c) for c in chats]
    summary = summarise(rows)
    result = {
        "model": str(model_dir),
        "data": str(args.data),
        "prompt": args.prompt,
        "follow_ups": args.follow_up,
        "lesion_follow_ups": args.lesion_follow_up,
        "max_new_tokens": args.max_new_tokens,
        "summary": summary,
    }
    text = table(summary)
    everything = summary["ALL"]
    loops = (
        f"looping: {everything['looping_chats']} of {everything['chats']} chats "
        f"({everything['looping_replies']} of {everything['replies']} replies; "
        f"{everything['replies_at_limit']} stopped at the {args.max_new_tokens}-token limit)"
    )
    write_jsonl(args.output / "describe.jsonl", rows)
    write_json(args.output / "describe.json", result)
    (args.output / "describe.md").write_text(text + "\n\n" + loops + "\n", encoding="utf-8")
    print(text)
    print(loops)
    return result


if __name__ == "__main__":
    main()
