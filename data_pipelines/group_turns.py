"""Merge single-turn VQA rows that ask about the same image into multi-turn conversations.

LLaVA-1.5 trains on VQAv2 this way: one conversation per image, several question-answer turns, the image only in
the first user turn. Each training sample then carries several supervised answers for one pass over the image
tokens (64 of a ~125-token medsynth VQA sample), so a step teaches about 5x more answers for ~2x the tokens.
Nothing in TRL or datasets does this grouping for image rows, hence this tool.

Usage:
    python -m data_pipelines.group_turns --input data/medsynth/vqa_train.jsonl \\
        --output data/medsynth/vqa_train_grouped.jsonl --max-turns 8 --seed 0
    python -m data_pipelines.group_turns --input data/slake/train.jsonl --output data/slake/train_grouped.jsonl
    python -m data_pipelines.group_turns --input data/medsynth_multi/longitudinal_train.jsonl \\
        data/medsynth_multi/volume_train.jsonl --output data/medsynth_multi/multi_train_g8.jsonl

Relative image paths are rewritten to stay valid from the output's folder. Rows are grouped by their image list (the same file(s), in order). Within an image the questions are shuffled
(seeded) and cut into conversations of at most --max-turns turns; the conversations are shuffled too. Each output
row keeps per-turn `answer_types` and `question_types` (so the trainer's `answer_suffix` can add eval's
instruction to every question) and `source_ids`. Rows that are not single-turn VQA (several turns, a system
prompt, no image) are written to OUTPUT.rejected.jsonl with the reason, and counted; a question asked twice about
the same image with the same answer is kept once (counted as a duplicate).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

from data_pipelines.common import Rejects, format_table, record_image_roots
from medllava.schema import (
    SchemaError,
    conversation,
    normalise_answer_type,
    normalise_text,
    read_jsonl,
    validate_structure,
    vqa_answer,
    vqa_question,
    write_jsonl,
)


def single_turn_problem(row: dict) -> str | None:
    """Why a row cannot be merged (None if it can)."""
    problems = validate_structure(row)
    if problems:
        return "; ".join(problems)
    if "messages" not in row:
        return "not an SFT row (DPO or GRPO rows are not merged)"
    roles = [m.get("role") for m in row["messages"]]
    if roles != ["user", "assistant"]:
        return f"not a single question and answer (roles {roles})"
    if not row.get("images"):
        return "no image"
    return None


def rebase(images: list[str], src_dir: Path, dst_dir: Path) -> list[str]:
    """Relative image paths of a file in src_dir, made relative to dst_dir (absolute ones unchanged)."""
    if src_dir.resolve() == dst_dir.resolve():
        return list(images)
    return [p if Path(p).is_absolute() else os.path.relpath(src_dir / p, dst_dir) for p in images]


def group_rows(rows: list[dict], max_turns: int, seed: int) -> tuple[list[dict], Counter]:
    """Conversations of <= max_turns turns, one image list each; also counts of duplicates dropped."""
    rnd = random.Random(seed)
    by_images: dict[tuple, list[dict]] = defaultdict(list)
    seen: set[tuple] = set()
    counts = Counter()
    for row in rows:
        key = tuple(row["images"])
        qa = (key, normalise_text(vqa_question(row)), normalise_text(vqa_answer(row)))
        if qa in seen:
            counts["duplicate"] += 1
            continue
        seen.add(qa)
        by_images[key].append(row)
    out = []
    for key, group in by_images.items():
        rnd.shuffle(group)
        for start in range(0, len(group), max_turns):
            chunk = group[start : start + max_turns]
            first = chunk[0]
            merged = {
                "id": f"{first['id']}+{len(chunk) - 1}" if len(chunk) > 1 else first["id"],
                "images": list(key),
                "messages": conversation([(vqa_question(r), vqa_answer(r)) for r in chunk], len(key)),
                "answer_types": [normalise_answer_type(r.get("answer_type")) for r in chunk],
                "question_types": [r.get("question_type") for r in chunk],
                "source_ids": [r["id"] for r in chunk],
            }
            for field in ("source", "modality", "region", "family"):
                if first.get(field) is not None:
                    merged[field] = first[field]
            out.append(merged)
    rnd.shuffle(out)
    return out, counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.group_turns",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input", required=True, type=Path, nargs="+", help="schema JSONL file(s) of single-turn VQA rows"
    )
    p.add_argument("--output", required=True, type=Path, help="grouped schema JSONL")
    p.add_argument("--max-turns", type=int, default=8, help="questions per conversation at most (default 8)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0); same seed, same bytes")
    args = p.parse_args(argv)
    if args.max_turns < 1:
        p.error("--max-turns must be >= 1")
    if any(path.resolve() == args.output.resolve() for path in args.input):
        p.error("--output must differ from every --input")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rejects = Rejects()
    rows = []
    try:
        for path in args.input:
            for line, row in read_jsonl(path):
                problem = single_turn_problem(row)
                if problem:
                    rejects.add(f"{path}:{line}", problem, row)
                else:
                    rows.append({**row, "images": rebase(row["images"], path.parent, args.output.parent)})
    except (OSError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grouped, counts = group_rows(rows, args.max_turns, args.seed)
    n = write_jsonl(args.output, grouped)
    turns = Counter(len(r["source_ids"]) for r in grouped)
    print(
        format_table(
            ["input rows", "merged", "duplicates dropped", "rejected", "conversations", "images"],
            [
                [
                    len(rows) + len(rejects),
                    len(rows) - counts["duplicate"],
                    counts["duplicate"],
                    len(rejects),
                    n,
                    len({tuple(r["images"]) for r in grouped}),
                ]
            ],
        )
    )
    print("turns per conversation: " + ", ".join(f"{k}: {turns[k]}" for k in sorted(turns)))
    rejects.report(args.output.with_suffix(".rejected.jsonl"))
    record_image_roots(args.output.parent, grouped)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
