"""Check every row of schema JSONL files; print a summary table; write rejected rows with their reasons.

Usage:
    python -m data_pipelines.validate data/vqa_rad/train.jsonl --image-root data/vqa_rad
    python -m data_pipelines.validate data/*.jsonl --model ~/.cache/medllava/base-112px --max-tokens 1024

Per row: JSON object, schema (id, images, messages / prompt+solution / prompt+chosen+rejected), every image
exists under the image root (default: the file's own directory) and decodes with medllava.processing.load_image,
image placeholders == images, roles alternate, no empty turns, no duplicate ids, and with --model the length in
tokens after image expansion (over --max-tokens is a rejection). Rejected rows go to FILE.rejected.jsonl (or
--rejects) with line number and reasons. Exits 1 if any row was rejected, unless --allow-rejects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.common import Rejects, format_table, progress
from medllava.schema import row_kind, validate_row


def validate_file(
    path: Path,
    image_root: Path | None = None,
    processor=None,
    max_tokens: int | None = None,
    decode_images: bool = True,
) -> tuple[Counter, Rejects, list[int]]:
    """(counts, rejects, token lengths) of one JSONL file; malformed lines are rejects, not crashes."""
    from medllava.schema import token_length

    root = image_root if image_root is not None else path.parent
    counts, rejects, lengths, seen_ids = Counter(), Rejects(), [], {}
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for line_no, line in enumerate(progress(lines, f"validating {path.name}", total=len(lines)), start=1):
        if not line.strip():
            continue
        counts["rows"] += 1
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.add(where, f"malformed JSON ({e.msg} at column {e.colno})", line.rstrip("\n")[:2000])
            continue
        reasons = validate_row(row, root, decode_images=decode_images)
        if isinstance(row, dict):
            row_id = row.get("id")
            if isinstance(row_id, str) and row_id in seen_ids:
                reasons.append(f"duplicate id {row_id!r} (first on line {seen_ids[row_id]})")
            elif isinstance(row_id, str):
                seen_ids[row_id] = line_no
        if not reasons and processor is not None:
            n = token_length(row, processor)
            lengths.append(n)
            if max_tokens is not None and n > max_tokens:
                reasons.append(f"{n} tokens > max {max_tokens} (image tokens are never truncated)")
        if reasons:
            rejects.add(where, reasons, row)
            continue
        counts["valid"] += 1
        counts[f"kind:{row_kind(row)}"] += 1
        counts[f"answer_type:{row.get('answer_type', '-')}"] += 1
        counts[f"source:{row.get('source', '-')}"] += 1
        counts["images"] += len(row.get("images", []))
    counts["rejected"] = len(rejects)
    return counts, rejects, lengths


def summary_table(results: dict[str, tuple[Counter, Rejects, list[int]]]) -> str:
    headers = [
        "file",
        "rows",
        "valid",
        "rejected",
        "sft",
        "grpo",
        "dpo",
        "OPEN",
        "CLOSED",
        "CHOICE",
        "images",
        "tokens mean/max",
    ]
    table = []
    for name, (c, _, lengths) in results.items():
        tokens = f"{statistics.mean(lengths):.0f}/{max(lengths)}" if lengths else "-"
        table.append(
            [
                name,
                c["rows"],
                c["valid"],
                c["rejected"],
                c["kind:sft"],
                c["kind:grpo"],
                c["kind:dpo"],
                c["answer_type:OPEN"],
                c["answer_type:CLOSED"],
                c["answer_type:CHOICE"],
                c["images"],
                tokens,
            ]
        )
    return format_table(headers, table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="schema JSONL file(s)")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="directory the rows' image paths are relative to (default: each file's directory)",
    )
    parser.add_argument("--model", default=None, help="model/processor directory for token lengths")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="reject rows longer than this (needs --model)"
    )
    parser.add_argument(
        "--rejects",
        type=Path,
        default=None,
        help="where to write rejected rows (default: FILE.rejected.jsonl next to each file)",
    )
    parser.add_argument("--no-decode", action="store_true", help="only check that images exist (faster)")
    parser.add_argument("--allow-rejects", action="store_true", help="exit 0 even if rows were rejected")
    args = parser.parse_args(argv)
    if args.max_tokens is not None and args.model is None:
        parser.error("--max-tokens needs --model (the tokenizer and image size decide the length)")
    if args.rejects is not None and len(args.files) > 1:
        parser.error("--rejects takes one file; with several inputs each gets FILE.rejected.jsonl")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    processor = None
    if args.model:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
    results = {}
    for path in args.files:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        results[str(path)] = validate_file(
            path, args.image_root, processor, args.max_tokens, not args.no_decode
        )
    print(summary_table(results))
    total = 0
    for name, (_, rejects, _) in results.items():
        total += len(rejects)
        out = args.rejects or Path(name).with_suffix(".rejected.jsonl")
        rejects.report(out if rejects else None, label=f"{name}: rejected")
    if total and not args.allow_rejects:
        print(f"{total} row(s) rejected: exit 1 (--allow-rejects to accept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
