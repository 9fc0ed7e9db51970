"""PathVQA (He et al. 2020) -> schema JSONL: OUT/train.jsonl, validate.jsonl, test.jsonl, OUT/images/.

Usage:
    python -m data_pipelines.pathvqa --input downloads/pvqa --output data/pathvqa

Two layouts of the released split are read:
- the original release: `qas/{train,val,test}/{split}_qa.pkl` (or `.json`), each a list of records with
  `image` (a name such as "train_0422"), `question`, `answer`, and images under `images/{split}/`.
  Pickles are read with an unpickler that only accepts plain Python containers (a pickle can run code);
- a Hugging Face datasets-like export: `*.parquet` or `*.jsonl` files whose names contain train / val(idation) /
  test, with `question`, `answer` and `image` as {"bytes": ..., "path": ...} or as a path.
Yes/no answers are CLOSED, all others OPEN (test: 6761 questions, 3391 closed, 3370 open). Writes
OUT/leakage.json (test/validate images duplicated in train, by perceptual hash).
"""

from __future__ import annotations

import base64
import io
import pickle
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_pipelines.common import (
    ImageStore,
    Rejects,
    VqaBuilder,
    converter_main,
    load_json_records,
    progress,
)

SOURCE = "pathvqa"
SPLIT_NAMES = {
    "train": "train",
    "val": "validate",
    "valid": "validate",
    "validation": "validate",
    "validate": "validate",
    "test": "test",
}


class _PlainUnpickler(pickle.Unpickler):
    """Loads only builtin containers and scalars: a pickle that needs any class is refused, not executed."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} (only plain lists/dicts are accepted)"
        )


def load_pickle(path: Path) -> list:
    with path.open("rb") as f:
        try:
            data = _PlainUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def split_of(path: Path) -> str | None:
    """'train_qa.pkl' -> train, 'validation-00000-of-00001.parquet' -> validate, else None."""
    stem = path.name.lower()
    for token in sorted(SPLIT_NAMES, key=len, reverse=True):
        if stem.startswith(token):
            return SPLIT_NAMES[token]
    return None


def _image_bytes(value) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an HF image cell: {"bytes", "path"}, a path string, or base64 in a dict."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):
            data = base64.b64decode(data)
        return data, path
    if isinstance(value, str):
        return None, value
    return None, None


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        return "." + (Image.open(io.BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - undecodable bytes are caught later by validation; keep a neutral name
        return ".img"


def iter_original(input_dir: Path) -> Iterator[tuple[str, str, int, dict]]:
    """(split, file name, index, record) from {split}_qa.pkl / .json files."""
    files = sorted(input_dir.rglob("*_qa.pkl")) + sorted(input_dir.rglob("*_qa.json"))
    for path in files:
        split = split_of(path)
        if split is None:
            continue
        records = load_pickle(path) if path.suffix == ".pkl" else load_json_records(path)
        for i, record in enumerate(records):
            yield split, path.name, i, record


def iter_exported(input_dir: Path) -> Iterator[tuple[str, str, int, dict]]:
    """(split, file name, index, record) from parquet / JSONL exports."""
    for path in sorted(input_dir.rglob("*.parquet")):
        try:
            import pyarrow.parquet as pq  # installed with `datasets` (the train extra)
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install -e '.[train]')") from None

        split = split_of(path)
        if split is None:
            continue
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield split, path.name, i, record
                i += 1
    for path in sorted(input_dir.rglob("*.jsonl")):
        split = split_of(path)
        if split is not None:
            for i, record in enumerate(load_json_records(path)):
                yield split, path.name, i, record


def convert(input_dir: Path, out_dir: Path, image_mode: str = "copy") -> tuple[dict, Rejects, int]:
    rejects = Rejects()
    builder = VqaBuilder(SOURCE, input_dir, ImageStore(out_dir, image_mode), rejects)
    splits: dict[str, list[dict]] = {}
    records = list(iter_original(input_dir))
    records = records or list(iter_exported(input_dir))
    if not records:
        raise FileNotFoundError(
            f"{input_dir}: no {{split}}_qa.pkl/.json, nor *.parquet/*.jsonl split files found"
        )
    counters: Counter = Counter()
    for split, name, i, record in progress(records, SOURCE, total=len(records)):
        where = f"{name}[{i}]"
        if not isinstance(record, dict):
            rejects.add(where, "record is not an object", repr(record)[:500])
            continue
        data, image_name = _image_bytes(record.get("image"))
        if data is not None:
            image_name = image_name or f"{split}_{counters[split]:05d}{_extension(data)}"
        counters[split] += 1
        loggable = {k: v for k, v in record.items() if k != "image"} | {"image": image_name}
        row = builder.row(
            where,
            loggable,
            f"{split}-{i}",
            image_name,
            record.get("question"),
            record.get("answer"),
            None,
            image_bytes=data,
        )
        if row is not None:
            splits.setdefault(split, []).append(row)
    order = [s for s in ("train", "validate", "test") if s in splits]
    return {s: splits[s] for s in order}, rejects, len(records)


def main(argv=None) -> int:
    return converter_main(__doc__, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
