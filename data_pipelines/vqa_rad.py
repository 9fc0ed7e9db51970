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

import sys
from pathlib import Path

from data_pipelines.common import (
    ImageStore,
    Rejects,
    VqaBuilder,
    converter_main,
    iter_records,
    load_json_records,
)

SOURCE = "vqa_rad"
JSON_NAME = "VQA_RAD Dataset Public.json"
METADATA = {  # row key: record key, in the rows' key order
    "question_type": "question_type",
    "organ": "image_organ",
    "phrase_type": "phrase_type",
}


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
    for where, record in iter_records(records, path.name, SOURCE, rejects):
        row = builder.record_row(where, record, "image_name", METADATA)
        if row is not None:
            splits[split_of(record)].append(row)
    return splits, rejects, len(records)


def main(argv=None) -> int:
    return converter_main(__doc__, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
