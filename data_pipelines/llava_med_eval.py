"""LLaVA-Med's downstream VQA files (`test.json`, and `train.json` where present) -> schema JSONL.

Usage:
    python -m data_pipelines.llava_med_eval --input downloads/llava_med_vqa_rad --output data/llava_med_vqa_rad

Each file is a JSON list of records: `id`, `image` (relative to the input directory or its `images/` folder),
`conversations` (from human/gpt, `<image>` in the human turn) and `answer_type` (CLOSED/OPEN). The last gpt
turn is the ground truth. train.json / val(idate).json / test.json become OUT/train.jsonl / validate.jsonl /
test.jsonl; images are copied to OUT/images/ (--images symlink|relative to avoid copies).
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
    llava_to_messages,
    load_json_records,
    progress,
    unique_id,
)
from medllava.schema import infer_answer_type, normalise_answer_type, validate_structure, vqa_answer

SOURCE = "llava_med_eval"
FILES = {"train": ("train.json",), "validate": ("validate.json", "val.json"), "test": ("test.json",)}


def split_files(input_dir: Path) -> dict[str, Path]:
    files = {}
    for split, names in FILES.items():
        for name in names:
            if (input_dir / name).is_file():
                files[split] = input_dir / name
                break
    if "test" not in files and not files:
        raise FileNotFoundError(f"{input_dir}: no test.json (or train.json / validate.json) found")
    return files


def convert(
    input_dir: Path, out_dir: Path, image_mode: str = "copy", source: str = SOURCE
) -> tuple[dict, Rejects, int]:
    rejects, store, seen = Rejects(), ImageStore(out_dir, image_mode), Counter()
    builder = VqaBuilder(source, input_dir, store, rejects)  # used for image lookup only
    splits, total = {}, 0
    for split, path in split_files(input_dir).items():
        records = load_json_records(path)
        total += len(records)
        rows = []
        for i, record in enumerate(progress(records, f"{source} {split}")):
            where = f"{path.name}[{i}]"
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                rejects.add(where, "record needs a string 'image'", record)
                continue
            image = builder.image_path(record["image"]) or builder.image_path(f"images/{record['image']}")
            if image is None:
                rejects.add(where, f"image not found: {record['image']} under {input_dir}", record)
                continue
            messages, problems = llava_to_messages(record.get("conversations"), 1)
            if problems:
                rejects.add(where, problems, record)
                continue
            row = {
                "id": unique_id(f"{source}-{record.get('id', i)}", seen),
                "images": [store.add(image, record["image"])],
                "messages": messages,
            }
            problems = validate_structure(row)
            if problems:
                rejects.add(where, problems, record)
                continue
            row["answer_type"] = normalise_answer_type(record.get("answer_type")) or infer_answer_type(
                vqa_answer(row)
            )
            row["source"] = source
            rows.append(row)
        splits[split] = rows
    return splits, rejects, total


def add_source_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=SOURCE, help="value of the rows' `source` and id prefix")


def main(argv=None) -> int:
    return converter_main(__doc__, convert, argv, add_source_arg, lambda args: (args.source,))


if __name__ == "__main__":
    sys.exit(main())
