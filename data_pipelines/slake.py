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
    converter_main,
    iter_records,
    load_json_records,
)

SOURCE = "slake"
SPLITS = ("train", "validate", "test")
METADATA = {  # row key: record key, in the rows' key order; "language" is normalised by convert()
    "question_type": "content_type",
    "modality": "modality",
    "location": "location",
    "language": "q_lang",
    "base_type": "base_type",
}


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
        for where, record in iter_records(records, path.name, f"{SOURCE} {split}", rejects):
            lang = str(record.get("q_lang", "en")).strip().lower()
            if languages is not None and lang not in languages:
                skipped[f"{split}:{lang}"] += 1
                continue
            row = builder.record_row(where, record, "img_name", METADATA, language=lang)
            if row is not None:
                rows.append(row)
        splits[split] = rows
    return splits, rejects, skipped


def add_language_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all-languages", action="store_true", help="keep every q_lang (default: English only)"
    )


def report_skipped(skipped: Counter) -> None:
    """Print the questions left out by language; SLAKE's summary has no source-record count."""
    if skipped:
        print(
            "left out by language (use --all-languages to keep): "
            + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        )


def main(argv=None) -> int:
    return converter_main(
        __doc__,
        convert,
        argv,
        add_language_arg,
        lambda args: (None if args.all_languages else ("en",),),
        report_skipped,
    )


if __name__ == "__main__":
    sys.exit(main())
