"""VQA-RAD (Lau et al. 2018, OSF release) -> schema JSONL: OUT/train.jsonl, OUT/test.jsonl, OUT/images/.

Usage:
    python -m data_pipelines.vqa_rad --input "downloads/VQA_RAD" --output data/vqa_rad

The release is `VQA_RAD Dataset Public.json` (a list of records: qid, image_name, question, answer,
answer_type CLOSED/OPEN, question_type, image_organ, phrase_type, ...) beside `VQA_RAD Image Folder/`.
It has no split field: the official test set is the questions whose `phrase_type` starts with "test"
(test_freeform, test_para; 451 questions: 272 closed, 179 open), everything else is train. Answers may be
numbers in the JSON; they become text, and yes/no answers are lower-cased. Writes OUT/leakage.json: test images
whose perceptual hash matches a train image (VQA-RAD reuses images across its splits).
"""

from __future__ import annotations

import argparse
import sys
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

SOURCE = "vqa_rad"
JSON_NAME = "VQA_RAD Dataset Public.json"


def find_json(input_dir: Path) -> Path:
    direct = input_dir / JSON_NAME
    if direct.is_file():
        return direct
    found = sorted(input_dir.rglob("VQA_RAD*Public*.json")) or sorted(input_dir.rglob("*.json"))
    if not found:
        raise FileNotFoundError(f"{input_dir}: no '{JSON_NAME}' found")
    return found[0]


def split_of(record: dict) -> str:
    return "test" if str(record.get("phrase_type", "")).strip().lower().startswith("test") else "train"


def convert(input_dir: Path, out_dir: Path, image_mode: str = "copy") -> tuple[dict, Rejects, int]:
    path = find_json(input_dir)
    records = load_json_records(path)
    rejects = Rejects()
    builder = VqaBuilder(SOURCE, input_dir, ImageStore(out_dir, image_mode), rejects)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i, record in enumerate(progress(records, SOURCE)):
        where = f"{path.name}[{i}]"
        if not isinstance(record, dict):
            rejects.add(where, "record is not an object", record)
            continue
        row = builder.row(
            where,
            record,
            record.get("qid"),
            record.get("image_name"),
            record.get("question"),
            record.get("answer"),
            record.get("answer_type"),
            question_type=record.get("question_type"),
            organ=record.get("image_organ"),
            phrase_type=record.get("phrase_type"),
        )
        if row is not None:
            splits[split_of(record)].append(row)
    return splits, rejects, len(records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_converter_args(parser)
    args = parser.parse_args(argv)
    try:
        splits, rejects, n = convert(args.input, args.output, args.images)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_splits(splits, args.output, rejects, args.leak_distance, {"records": n})
    return 0


if __name__ == "__main__":
    sys.exit(main())
