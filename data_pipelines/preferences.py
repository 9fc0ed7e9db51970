"""Preference and RL data from schema VQA rows: DPO pairs (TRL conversational format) and GRPO prompt sets.

Usage:
    # DPO: ground truth (chosen) against a model's wrong answers (rejected), from an eval predictions file
    python -m data_pipelines.preferences dpo-predictions --predictions runs/eval/predictions.jsonl \\
        --data data/vqa_rad/train.jsonl --output data/dpo/vqa_rad_model.jsonl
    # DPO: ground truth against attribute-swapped hallucinations (yes/no, left/right, upper/lower, numbers, modality)
    python -m data_pipelines.preferences dpo-swap --input data/vqa_rad/train.jsonl --output data/dpo/swap.jsonl
    # GRPO: prompts with a verifiable solution (yes/no, short answer, or a multiple-choice letter with --choices 4)
    python -m data_pipelines.preferences grpo --input data/vqa_rad/train.jsonl --output data/grpo/train.jsonl

DPO rows: {"id", "images", "prompt": [messages up to the question], "chosen": [assistant turn],
"rejected": [assistant turn], ...metadata}. GRPO rows: {"id", "images", "prompt", "solution", "answer_type"}.
Wrongness of a prediction is `medllava.metrics.accuracy` (the same function the GRPO reward uses) below
--wrong-below. Rows that yield nothing (correct predictions, no swappable attribute, answers too long) are counted
in the printed table; malformed ones are written with reasons to OUTPUT.rejected.jsonl.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from data_pipelines.common import Rejects, format_table, progress, unique_id
from medllava.prompts import extract_answer, split_stated, stated_answer
from medllava.schema import (
    CHOICE,
    CLOSED,
    OPEN,
    SchemaError,
    message,
    normalise_text,
    prompt_messages,
    read_jsonl,
    validate_structure,
    vqa_answer,
    vqa_question,
    write_jsonl,
)

METADATA = ("answer_type", "question_type", "modality", "source")

# ---------------------------------------------------------------------------------------------------------------
# Attribute swaps: plain functions text -> hallucinated text (or None), picked by name
# ---------------------------------------------------------------------------------------------------------------


def _match_case(word: str, replacement: str) -> str:
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _swap_words(pairs: dict[str, str]) -> Callable[[str, random.Random], str | None]:
    pattern = re.compile(
        r"\b(" + "|".join(map(re.escape, sorted(pairs, key=len, reverse=True))) + r")\b", re.IGNORECASE
    )

    def swap(text: str, rng: random.Random) -> str | None:
        out = pattern.sub(lambda m: _match_case(m.group(0), pairs[m.group(0).lower()]), text)
        return out if out != text else None

    return swap


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBER_RE = re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def swap_number(text: str, rng: random.Random) -> str | None:
    """Change the first count/number (digits or zero..ten) by 1 or 2, never below zero."""
    match = _NUMBER_RE.search(text)
    if not match:
        return None
    word = match.group(0)
    value = int(word) if word.isdigit() else _NUMBER_WORDS.index(word.lower())
    new = value + rng.choice([d for d in (-2, -1, 1, 2) if value + d >= 0])
    replacement = str(new) if word.isdigit() or new > 10 else _match_case(word, _NUMBER_WORDS[new])
    return text[: match.start()] + replacement + text[match.end() :]


SWAPS: dict[str, Callable[[str, random.Random], str | None]] = {
    "yes_no": _swap_words({"yes": "no", "no": "yes"}),
    "left_right": _swap_words({"left": "right", "right": "left"}),
    "upper_lower": _swap_words(
        {"upper": "lower", "lower": "upper", "superior": "inferior", "inferior": "superior"}
    ),
    "number": swap_number,
    "modality": _swap_words(
        {
            "ct": "MRI",
            "mri": "CT",
            "mr": "CT",
            "x-ray": "CT",
            "xray": "CT",
            "radiograph": "CT scan",
            "ultrasound": "MRI",
            "pet": "MRI",
        }
    ),
}


def hallucinate(answer: str, rng: random.Random, names=tuple(SWAPS)) -> tuple[str, str] | None:
    """(swap name, changed answer) from the first swap that applies, else None. A stated-finding closed answer
    ("There is no lesion. No.") keeps its statement and gets the other verdict: the rejected reply contradicts
    itself, which is what the preference should teach against (swapping words in the statement would not)."""
    stated = split_stated(answer)
    if stated is not None:
        if "yes_no" not in names:
            return None
        statement, verdict = stated
        return "yes_no", stated_answer(statement, "no" if verdict.lower() == "yes" else "yes")
    for name in names:
        changed = SWAPS[name](answer, rng)
        if changed is not None and normalise_text(changed) != normalise_text(answer):
            return name, changed
    return None


# ---------------------------------------------------------------------------------------------------------------
# Row builders
# ---------------------------------------------------------------------------------------------------------------


def dpo_row(row: dict, row_id: str, chosen: str, rejected: str, **extra) -> dict:
    out = {
        "id": row_id,
        "images": list(row.get("images", [])),
        "prompt": prompt_messages(row),
        "chosen": [message("assistant", chosen)],
        "rejected": [message("assistant", rejected)],
    }
    out.update({k: row[k] for k in METADATA if k in row})
    out.update(extra)
    return out


def grpo_row(
    row: dict, row_id: str, solution: str, answer_type: str, prompt: list[dict] | None = None, **extra
) -> dict:
    out = {
        "id": row_id,
        "images": list(row.get("images", [])),
        "prompt": prompt or prompt_messages(row),
        "solution": solution,
    }
    out.update({k: row[k] for k in METADATA if k in row})
    out["answer_type"] = answer_type
    out.update(extra)
    return out


def choice_prompt(row: dict, options: list[str]) -> list[dict]:
    """The row's prompt with its last user question turned into a lettered multiple-choice question."""
    prompt = prompt_messages(row)
    letters = "ABCDEFGHIJ"
    text = vqa_question(row) + "\nOptions:\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    text += "\nAnswer with the letter of the correct option."
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    n_images = sum(1 for p in prompt[last]["content"] if isinstance(p, dict) and p.get("type") == "image")
    prompt[last] = message("user", text, n_images)
    return prompt


def _load(path: Path, rejects: Rejects) -> list[dict]:
    """Schema rows that pass the structural check; the others go to `rejects`."""
    rows = []
    for line_no, row in read_jsonl(path):
        problems = validate_structure(row)
        if problems:
            rejects.add(f"{path}:{line_no}", problems, row)
        else:
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def cmd_dpo_predictions(args) -> tuple[list[dict], Rejects, Counter]:
    from medllava.metrics import accuracy

    rejects, counts, seen, out = Rejects(), Counter(), Counter(), []
    data = {r["id"]: r for r in _load(args.data, rejects)}
    for line_no, pred in progress(list(read_jsonl(args.predictions)), "dpo-predictions"):
        where = f"{args.predictions}:{line_no}"
        counts["predictions"] += 1
        row = data.get(pred.get("id"))
        prediction = pred.get("prediction")
        if row is None:
            rejects.add(where, f"id {pred.get('id')!r} not found in {args.data}", pred)
            continue
        if not isinstance(prediction, str) or not prediction.strip():
            rejects.add(where, "empty or missing prediction", pred)
            continue
        answer = vqa_answer(row)
        answer_type = pred.get("answer_type") or row.get("answer_type")
        if accuracy(prediction, answer, answer_type) >= args.wrong_below:
            counts["correct (no pair)"] += 1
            continue
        out.append(
            dpo_row(
                row, unique_id(f"{row['id']}-dpo", seen), answer, prediction.strip(), rejected_from="model"
            )
        )
    counts["pairs"] = len(out)
    return out, rejects, counts


def cmd_dpo_swap(args) -> tuple[list[dict], Rejects, Counter]:
    rejects, counts, seen, out = Rejects(), Counter(), Counter(), []
    names = tuple(args.swaps.split(",")) if args.swaps else tuple(SWAPS)
    unknown = set(names) - set(SWAPS)
    if unknown:
        raise ValueError(f"unknown swap(s) {sorted(unknown)}; choose from {', '.join(SWAPS)}")
    for row in progress(_load(args.input, rejects), "dpo-swap"):
        counts["rows"] += 1
        answer = vqa_answer(row)
        rng = random.Random(f"{args.seed}:{row['id']}")
        swapped = hallucinate(answer, rng, names)
        if swapped is None:
            counts["no swappable attribute"] += 1
            continue
        name, wrong = swapped
        counts[f"swap:{name}"] += 1
        out.append(
            dpo_row(row, unique_id(f"{row['id']}-swap", seen), answer, wrong, rejected_from=f"swap:{name}")
        )
    counts["pairs"] = len(out)
    return out, rejects, counts


def cmd_grpo(args) -> tuple[list[dict], Rejects, Counter]:
    rejects, counts, seen, out = Rejects(), Counter(), Counter(), []
    rows = _load(args.input, rejects)
    pool: dict[
        str, list[str]
    ] = {}  # question_type -> distinct short answers, for multiple-choice distractors
    for row in rows:
        answer = vqa_answer(row)
        if row.get("answer_type") != CLOSED and len(answer.split()) <= args.max_answer_words:
            pool.setdefault(row.get("question_type") or "", [])
            if normalise_text(answer) not in map(normalise_text, pool[row.get("question_type") or ""]):
                pool[row.get("question_type") or ""].append(answer)
    everything = sorted({a for answers in pool.values() for a in answers})
    for row in progress(rows, "grpo"):
        answer = vqa_answer(row)
        kind = row.get("answer_type")
        row_id = unique_id(f"{row['id']}-grpo", seen)
        if kind == CHOICE:
            letter = re.fullmatch(r"\(?([A-Ja-j])\)?\.?", answer.strip())
            if not letter:
                rejects.add(row["id"], f"CHOICE answer {answer!r} is not an option letter", row)
                continue
            out.append(grpo_row(row, row_id, letter.group(1).upper(), CHOICE))
        elif normalise_text(extract_answer(answer)) in ("yes", "no"):
            # a stated-finding answer is verified on its verdict
            out.append(grpo_row(row, row_id, normalise_text(extract_answer(answer)), CLOSED))
        elif len(answer.split()) > args.max_answer_words:
            counts[f"answer over {args.max_answer_words} words (left out)"] += 1
            continue
        elif args.choices:
            rng = random.Random(f"{args.seed}:{row['id']}")
            same = [
                a
                for a in pool.get(row.get("question_type") or "", [])
                if normalise_text(a) != normalise_text(answer)
            ]
            others = [a for a in everything if normalise_text(a) != normalise_text(answer) and a not in same]
            distractors = rng.sample(same, min(len(same), args.choices - 1))
            distractors += rng.sample(others, min(len(others), args.choices - 1 - len(distractors)))
            if len(distractors) < args.choices - 1:
                counts["too few distinct answers for choices (left out)"] += 1
                continue
            options = distractors + [answer]
            rng.shuffle(options)
            letter = "ABCDEFGHIJ"[options.index(answer)]
            out.append(grpo_row(row, row_id, letter, CHOICE, choice_prompt(row, options), choices=options))
        else:
            out.append(grpo_row(row, row_id, answer, kind if kind in (OPEN, CLOSED) else OPEN))
    counts["rows"] = len(rows)
    counts["prompts"] = len(out)
    counts.update(f"solution:{r['answer_type']}" for r in out)
    return out, rejects, counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dpo-predictions", help="ground truth vs a model's wrong answers")
    p.add_argument(
        "--predictions", required=True, type=Path, help="eval predictions.jsonl (id, prediction, ...)"
    )
    p.add_argument("--data", required=True, type=Path, help="the schema JSONL the predictions were made on")
    p.add_argument(
        "--wrong-below",
        type=float,
        default=1.0,
        help="a prediction is wrong when medllava.metrics.accuracy is below this (default 1.0)",
    )
    p.set_defaults(func=cmd_dpo_predictions)
    p = sub.add_parser("dpo-swap", help="ground truth vs attribute-swapped hallucinations")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument(
        "--swaps", default=None, help=f"comma-separated, in order of preference (default: {','.join(SWAPS)})"
    )
    p.set_defaults(func=cmd_dpo_swap)
    p = sub.add_parser("grpo", help="prompts with a verifiable solution")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument(
        "--max-answer-words", type=int, default=5, help="longer open answers are left out (counted)"
    )
    p.add_argument(
        "--choices",
        type=int,
        default=0,
        help="turn open short-answer rows into N-option multiple choice (letter solutions); 0: off",
    )
    p.set_defaults(func=cmd_grpo)
    for p in sub.choices.values():
        p.add_argument("--output", required=True, type=Path)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if getattr(args, "choices", 0) and not 2 <= args.choices <= 10:
        parser.error("--choices must be between 2 and 10")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows, rejects, counts = args.func(args)
    except (OSError, ValueError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(args.output, rows)
    print(format_table(["count", "n"], sorted(counts.items())))
    rejects.report(args.output.with_suffix(".rejected.jsonl"))
    print(f"wrote {args.output} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
