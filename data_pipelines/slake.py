"""SLAKE (Liu et al. 2021, Slake1.0 release) -> schema JSONL: OUT/train.jsonl, validate.jsonl, test.jsonl.

Usage:
    python -m data_pipelines.slake --input downloads/Slake1.0 --output data/slake
    python -m data_pipelines.slake --input downloads/Slake1.0 --output data/slake_all --all-languages

The release holds `train.json`, `validate.json`, `test.json` (records: img_id, img_name, question, answer,
answer_type OPEN/CLOSED, q_lang en/zh, content_type, modality, location, base_type, qid, ...) and `imgs/`
with one folder per image (`imgs/xmlab0/source.jpg`). English questions only by default (test: 1061, of them
645 open and 416 closed); --all-languages keeps Chinese too. Questions in other languages are counted, not
rejected. Writes OUT/leakage.json (test/validate images duplicated in train, by perceptual hash).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.common import (
    ImageStore,
    Rejects,
    VqaBuilder,
    add_converter_args,
    load_json_records,
    progress,
    write_splits,
)

SOURCE = "slake"
SPLITS = ("train", "validate", "test")


def split_files(input_dir: Path) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        direct = input_dir / f"{split}.json"
        found = [direct] if direct.is_file() else sorted(input_dir.rglob(f"{split}.json"))
        if found:
            files[split] = found[0]
    if not files:
        raise FileNotFoundError(f"{input_dir}: none of {', '.join(s + '.json' for s in SPLITS)} found")
    return files


def image_root(json_path: Path) -> Path:
    imgs = json_path.parent / "imgs"
    return imgs if imgs.is_dir() else json_path.parent


def convert(
    input_dir: Path, out_dir: Path, image_mode: str = "copy", languages: tuple[str, ...] | None = ("en",)
) -> tuple[dict, Rejects, Counter]:
    rejects = Rejects()
    store = ImageStore(out_dir, image_mode)
    splits, skipped, n, seen = {}, Counter(), Counter(), Counter()
    for split, path in split_files(input_dir).items():
        builder = VqaBuilder(SOURCE, image_root(path), store, rejects)
        builder.seen = seen  # ids unique across splits
        records = load_json_records(path)
        n[split] = len(records)
        rows = []
        for i, record in enumerate(progress(records, f"{SOURCE} {split}")):
            where = f"{path.name}[{i}]"
            if not isinstance(record, dict):
                rejects.add(where, "record is not an object", record)
                continue
            lang = str(record.get("q_lang", "en")).strip().lower()
            if languages is not None and lang not in languages:
                skipped[f"{split}:{lang}"] += 1
                continue
            row = builder.row(
                where,
                record,
                record.get("qid"),
                record.get("img_name"),
                record.get("question"),
                record.get("answer"),
                record.get("answer_type"),
                question_type=record.get("content_type"),
                modality=record.get("modality"),
                location=record.get("location"),
                language=lang,
                base_type=record.get("base_type"),
            )
            if row is not None:
                rows.append(row)
        splits[split] = rows
    return splits, rejects, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_converter_args(parser)
    parser.add_argument(
        "--all-languages", action="store_true", help="keep every q_lang (default: English only)"
    )
    args = parser.parse_args(argv)
    try:
        splits, rejects, skipped = convert(
            args.input, args.output, args.images, None if args.all_languages else ("en",)
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(
            "left out by language (use --all-languages to keep): "
            + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        )
    write_splits(splits, args.output, rejects, args.leak_distance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
