"""Stage 1 (alignment) data: figure-caption pairs -> schema rows "describe this image briefly" -> caption.

Usage:
    python -m data_pipelines.captions --input llava_med_alignment_500k.json --image-root pmc_images \\
        --output data/stage1/train.jsonl
    python -m data_pipelines.captions --input captions.csv --image-root images --output data/stage1/train.jsonl

Inputs: LLaVA-Med's alignment JSON (`id`, `image`, `conversations` with `human`/`gpt` and `<image>`; the
caption is the gpt turn) or a CSV / JSONL with an image column and a caption column (`--image-column`,
`--caption-column`; default names `image` and `caption`). Each caption gets an instruction drawn from our own
pool of brief-description requests (deterministic per row id and --seed); `--keep-instructions` keeps the
human turn of an alignment file instead. Image paths in the output are relative to the output file's directory.
Rows with a missing image, an empty caption or a broken conversation are written, with reasons, to
OUTPUT.rejected.jsonl (`--no-image-check` keeps rows whose images are not on disk yet).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.common import (
    Rejects,
    llava_to_messages,
    load_json_records,
    progress,
    unique_id,
    write_rows,
)
from medllava.schema import content_text, conversation, validate_structure

# Our own pool: short requests for a brief description, varied in wording and register.
BRIEF_INSTRUCTIONS = (
    "Describe this image briefly.",
    "Give a short description of the image.",
    "What does this figure show? Keep it brief.",
    "Summarise the content of this image in a sentence or two.",
    "Provide a concise caption for this image.",
    "Briefly, what is shown here?",
    "In a few words, describe what you see.",
    "Write a short caption for this medical image.",
    "What is depicted in this image? Answer concisely.",
    "Offer a brief overview of this figure.",
    "Tell me, in short, what this picture shows.",
    "Give a compact description of the visual content.",
    "Describe the main content of this image in brief.",
    "What can be seen in this image? A short answer is enough.",
    "Caption this figure concisely.",
    "Sum up this image in one or two sentences.",
)


def pick_instruction(row_id: str, seed: int = 0, pool=BRIEF_INSTRUCTIONS) -> str:
    """A deterministic choice from the pool for this row (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return pool[int.from_bytes(digest[:4], "big") % len(pool)]


def read_records(path: Path, image_column: str, caption_column: str) -> list[dict]:
    """Source records as dicts with `id`, `image`, and either `caption` or `conversations`."""
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            missing = {image_column, caption_column} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
            return [dict(r) for r in reader]
    return load_json_records(path)


def convert_record(
    record: dict, index: int, args, image_root: Path, out_dir: Path
) -> tuple[dict | None, list[str]]:
    """One source record -> (schema row, []) or (None, reasons)."""
    if not isinstance(record, dict):
        return None, ["record is not an object"]
    image = record.get(args.image_column) or record.get("image")
    if not isinstance(image, str) or not image.strip():
        return None, [f"no image path in column {args.image_column!r}"]
    source_id = str(record.get("id") or record.get("pair_id") or Path(image).stem or index)
    image_path = Path(image) if Path(image).is_absolute() else image_root / image
    if not args.no_image_check and not image_path.is_file():
        return None, [f"image not found: {image_path}"]
    row_path = os.path.relpath(
        image_path.resolve() if image_path.exists() else image_path.absolute(), out_dir
    )
    if "conversations" in record:
        messages, problems = llava_to_messages(record["conversations"], 1)
        if problems:
            return None, problems
        if not args.keep_instructions:
            captions = [content_text(m["content"]).strip() for m in messages if m["role"] == "assistant"]
            if len(captions) != 1:
                return None, [f"expected one gpt caption turn, found {len(captions)}"]
            messages = conversation([(pick_instruction(source_id, args.seed), captions[0])])
    else:
        caption = record.get(args.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            return None, [f"empty caption in column {args.caption_column!r}"]
        messages = conversation([(pick_instruction(source_id, args.seed), caption.strip())])
    row = {
        "id": f"{args.source}-{source_id}",
        "images": [row_path],
        "messages": messages,
        "source": args.source,
    }
    problems = validate_structure(row)
    return (None, problems) if problems else (row, [])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, type=Path, help="alignment JSON / JSONL, or CSV/TSV")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="directory the input's image paths are relative to (default: the input's directory)",
    )
    parser.add_argument("--output", required=True, type=Path, help="schema JSONL to write")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--source", default="captions", help="value of the rows' `source` and id prefix")
    parser.add_argument("--seed", type=int, default=0, help="instruction choice seed")
    parser.add_argument(
        "--keep-instructions",
        action="store_true",
        help="keep the alignment file's own human turns instead of our instruction pool",
    )
    parser.add_argument("--no-image-check", action="store_true", help="keep rows whose image file is missing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.input.is_file():
        print(f"error: {args.input}: no such file", file=sys.stderr)
        return 2
    image_root = args.image_root or args.input.parent
    out_dir = args.output.parent.resolve()
    try:
        records = read_records(args.input, args.image_column, args.caption_column)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, rejects, seen = [], Rejects(), Counter()
    for i, record in enumerate(progress(records, "captions")):
        row, problems = convert_record(record, i, args, image_root, out_dir)
        if row is None:
            rejects.add(f"{args.input}[{i}]", problems, record)
            continue
        row["id"] = unique_id(row["id"], seen)
        rows.append(row)
    instructions = Counter(content_text(r["messages"][0]["content"]) for r in rows)
    write_rows(
        args.output,
        rows,
        rejects,
        ["input records", "rows written", "rejected", "distinct instructions"],
        [len(records), len(rows), len(rejects), len(instructions)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
