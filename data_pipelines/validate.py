"""Check every row of schema JSONL files; print a summary table; write rejected rows with their reasons.

Usage:
    python -m data_pipelines.validate data/vqa_rad/train.jsonl --image-root data/vqa_rad
    python -m data_pipelines.validate data/*.jsonl --model ~/.cache/medllava/base-112px --max-tokens 1024

Per row: a UTF-8 JSON object, the schema (id, images, messages / prompt+solution / prompt+chosen+rejected);
every image path resolves (symlinks followed) inside the image root (default: the file's own directory; also
the folders its converter recorded in ROOT/image_roots.json and those given with --allow-root), exists and
decodes with medllava.processing.load_image; image placeholders == images, roles alternate, no empty turns, no
chat control token in text (medllava.schema.CONTROL_TOKENS), every string encodes as UTF-8, no duplicate ids,
and with --model the length in tokens after image expansion (over --max-tokens is a rejection). A line that
cannot be read (not UTF-8, malformed or too deeply nested JSON) is a rejected row like any other: the rest of
the file is still checked. Rejected rows go to FILE.rejected.jsonl (or --rejects) with line number and
reasons. Exits 1 if any row was rejected, unless --allow-rejects.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.common import Rejects, format_table, progress
from medllava.schema import (
    IMAGE_ROOTS_FILE,
    MAX_ROW_DEPTH,
    SchemaError,
    allowed_roots,
    nesting_depth,
    parse_jsonl_line,
    recorded_image_roots,
    row_kind,
    validate_row,
)


def raw_text(raw: bytes, limit: int = 2000) -> str:
    """A line that cannot be kept as a row, for the rejects file: its first `limit` bytes, undecodable bytes
    as backslash escapes."""
    return raw.rstrip(b"\r\n")[:limit].decode("utf-8", "backslashreplace")


def validate_file(
    path: Path,
    image_root: Path | None = None,
    processor=None,
    max_tokens: int | None = None,
    decode_images: bool = True,
    allow_roots: tuple[Path, ...] = (),
) -> tuple[Counter, Rejects, list[int]]:
    """(counts, rejects, token lengths) of one JSONL file; lines that cannot be read are rejects, not crashes.

    Raises SchemaError only for a malformed ROOT/image_roots.json (it concerns every row)."""
    from medllava.schema import token_length

    root = image_root if image_root is not None else path.parent
    allowed_roots(root, allow_roots)  # a malformed image_roots.json fails here, once, not on every row
    counts, rejects, lengths, seen_ids = Counter(), Rejects(), [], {}
    with path.open("rb") as f:
        lines = f.readlines()
    for line_no, raw in enumerate(progress(lines, f"validating {path.name}", total=len(lines)), start=1):
        if not raw.strip():
            continue
        counts["rows"] += 1
        where = f"{path}:{line_no}"
        row, problem = parse_jsonl_line(raw)
        if problem:
            rejects.add(where, problem, raw_text(raw))
            continue
        reasons = validate_row(row, root, decode_images=decode_images, allow_roots=allow_roots)
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
            rejects.add(where, reasons, row if nesting_depth(row) <= MAX_ROW_DEPTH else raw_text(raw))
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
        help="directory the rows' image paths are relative to and must stay inside (default: each file's "
        "directory)",
    )
    parser.add_argument(
        "--allow-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also accept images that resolve inside DIR (repeatable); without it, an image outside the "
        f"image root (and the folders its converter recorded in {IMAGE_ROOTS_FILE}) is a rejection",
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
    for root in args.allow_root:
        if not root.is_dir():
            parser.error(f"--allow-root {root}: not a directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    processor = None
    if args.model:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
    results, recorded = {}, {}
    for path in args.files:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        root = args.image_root if args.image_root is not None else path.parent
        try:
            results[str(path)] = validate_file(
                path, args.image_root, processor, args.max_tokens, not args.no_decode, tuple(args.allow_root)
            )
            recorded[str(path)] = recorded_image_roots(root)
        except SchemaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(summary_table(results))
    for name, roots in recorded.items():
        if roots:
            print(
                f"{name}: images may also come from {', '.join(map(str, roots))} (recorded by its converter "
                f"in {IMAGE_ROOTS_FILE})"
            )
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
