"""Text-only copies of image questions, with the image replaced by its caption.

A small LLM answers "what modality is this?" from the image long before it can answer "is this an X-ray?": the
closed question needs the name in the question compared with what the image shows, and SmolLM2-135M cannot even
compare it with a sentence that states the answer (`python -m eval.diagnostics.yesno --tell`, docs/eval.md). Told rows teach
that comparison in words, cheaply (a caption is ~25 tokens, an image 64): each output row is a VQA conversation
whose image is replaced by "Image description: <the image's caption>" before the first question. Mixed into the
starter's stage 3 (a third of the conversations), they taught the comparison in words (AUC 0.85 when told) but
barely from the image (0.55; docs/starter_v1_card.md), so the starter does not use them. Nothing in TRL or datasets builds
such rows, hence this tool.

Usage:
    python -m data_pipelines.described --vqa data/medsynth/vqa_train_g16.jsonl \\
        --captions data/medsynth/captions_train.jsonl --output data/medsynth/vqa_train_described.jsonl \\
        --answer-types CLOSED --fraction 0.33 --seed 0

Rows are matched to captions by their (single) image file. `--answer-types` keeps only the turns of those types
(a row's `answer_type`, or the per-turn `answer_types` of data_pipelines.group_turns output; the per-turn lists
are filtered alongside); `--fraction` keeps a seeded random share of the rows. Rows without a caption, with no
kept turn, or with other than one image are written to OUTPUT.rejected.jsonl with the reason and counted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.common import Rejects, format_table
from medllava.schema import (
    SchemaError,
    content_text,
    read_jsonl,
    resolve_image,
    validate_structure,
    vqa_answer,
    write_jsonl,
)

PREFIX = "Image description:"
PER_TURN = ("answer_types", "question_types", "source_ids")


def image_key(path: str, folder: Path) -> str:
    return os.path.normpath(resolve_image(path, folder))


def read_captions(path: Path) -> dict[str, str]:
    """{image file: caption} from a captions file (one image, one caption per row)."""
    captions = {}
    for line, row in read_jsonl(path):
        images = row.get("images") or []
        if len(images) != 1 or "messages" not in row:
            raise SchemaError(f"{path}:{line}: a caption row needs one image and messages")
        captions[image_key(images[0], path.parent)] = vqa_answer(row)
    return captions


def describe(row: dict, caption: str, answer_types: set[str] | None) -> tuple[dict | None, str | None]:
    """(text-only row, None) or (None, why not), for a row that passed validate_structure (so its turns
    alternate user/assistant and end with an answer)."""
    messages = row["messages"]
    if messages[0]["role"] == "system":
        return None, "a system turn (described rows have user/assistant turns only)"
    turns = list(zip(messages[::2], messages[1::2], strict=True))
    per_turn = row.get("answer_types") or [row.get("answer_type")] * len(turns)
    if len(per_turn) != len(turns):
        return None, f"{len(per_turn)} answer_types for {len(turns)} turns"
    keep = [i for i, t in enumerate(per_turn) if answer_types is None or t in answer_types]
    if not keep:
        return None, "no turn of the kept answer types"
    out = {k: v for k, v in row.items() if k not in PER_TURN + ("images", "messages")}
    out["id"] = f"{row['id']}-described"
    out["images"] = []
    new_messages = []
    for n, i in enumerate(keep):
        user, assistant = turns[i]
        text = content_text(user["content"]).strip()  # content may be a string or a list of parts
        if n == 0:
            text = f"{PREFIX} {caption} {text}"
        new_messages += [{"role": "user", "content": [{"type": "text", "text": text}]}, assistant]
    out["messages"] = new_messages
    for key in PER_TURN:
        if key in row:
            out[key] = [row[key][i] for i in keep]
    return out, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.described", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--vqa", type=Path, required=True, help="VQA rows (single-turn or group_turns output)"
    )
    parser.add_argument("--captions", type=Path, required=True, help="caption rows of the same images")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--answer-types", nargs="+", default=None, help="keep only these turns, e.g. CLOSED")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the rows to describe (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1]")
    captions = read_captions(args.captions)
    answer_types = {t.upper() for t in args.answer_types} if args.answer_types else None
    rejects, out, counts = Rejects(), [], Counter()
    rows = list(read_jsonl(args.vqa))
    rnd = random.Random(args.seed)
    chosen = sorted(rnd.sample(range(len(rows)), round(args.fraction * len(rows))))
    for index in chosen:
        line, row = rows[index]
        where = f"{args.vqa}:{line}"
        problems = validate_structure(row)
        if not problems and "messages" not in row:
            problems = ["not an SFT row"]
        if not problems and len(row.get("images") or []) != 1:
            problems = [f"{len(row.get('images') or [])} images (one expected)"]
        if problems:
            rejects.add(where, problems, row)
            continue
        caption = captions.get(image_key(row["images"][0], args.vqa.parent))
        if caption is None:
            rejects.add(where, f"no caption for {row['images'][0]}", row)
            continue
        described, why = describe(row, caption, answer_types)
        if described is None:
            rejects.add(where, why, row)
            continue
        out.append(described)
        counts["turns"] += len(described["messages"]) // 2
    write_jsonl(args.output, out)
    rejects.report(args.output.with_suffix(".rejected.jsonl"))
    print(
        format_table(
            ["input rows", "chosen", "described", "turns", "rejected"],
            [[len(rows), len(chosen), len(out), counts["turns"], len(rejects)]],
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
