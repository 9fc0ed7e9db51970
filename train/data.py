"""Training data: schema JSONL rows -> a `datasets.Dataset` for SFT, DPO or GRPO.

Every row is validated (medllava.schema.read_valid_rows) and every image it names is decoded once before the first
step (medllava.schema.image_problem, through medllava.processing.load_image, cached per file): a missing or corrupt
image is an error listing every bad row as file:line: reason, rather than a crash at the step that reaches it.
Rows longer than max_length tokens are dropped and counted, never truncated (cutting would drop image tokens).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medllava.processing import load_image
from medllava.prompts import add_answer_suffix
from medllava.schema import SchemaError, image_problem, read_valid_rows, row_kind, token_length

logger = logging.getLogger("medllava.train")


def _image_problem(path: str) -> str | None:
    try:
        return image_problem(path)
    except OSError as e:
        # e.g. a file name too long for the filesystem: a reason for this row, not a crash of the whole check
        return f"image unreadable: {path[:200]}: {type(e).__name__}: {e.strerror}"


def check_images(path, numbered_rows: list[tuple[int, dict]]) -> None:
    """Raise SchemaError naming every row (file:line: reasons) whose images are missing or do not decode.

    Each distinct file is decoded once (in threads: Pillow decodes outside the GIL); rows sharing an image share
    the result, and medllava.schema caches it per path for the eval file and later runs in this process.
    """
    start = time.perf_counter()
    files = sorted({p for _, row in numbered_rows for p in row["images"]})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = dict(zip(files, pool.map(_image_problem, files), strict=True))
    bad = []
    for line_no, row in numbered_rows:
        reasons = [problems[p] for p in row["images"] if problems[p]]
        if reasons:
            bad.append(f"{path}:{line_no}: {'; '.join(reasons)}")
    if bad:
        raise SchemaError(
            f"{path}: {len(bad)} of {len(numbered_rows)} rows name images that are missing or do not decode "
            "(fix or remove these rows):\n" + "\n".join(bad)
        )
    logger.info("%s: %d images decode (%.1f s)", path, len(files), time.perf_counter() - start)


def load_rows(
    path: str | Path, image_root: str | Path | None = None, limit: int | None = None, allow_roots=()
) -> list[dict]:
    """Schema rows with image paths made absolute (relative to `image_root`, default the file's directory; they
    must stay inside it, the roots recorded beside it or `allow_roots`: medllava.schema.read_valid_rows).

    A malformed row is an error naming the file, line and reason; rows whose images are missing or do not decode
    are all named in one error (fix the data, do not skip).
    """
    numbered = list(read_valid_rows(path, image_root, limit=limit, allow_roots=allow_roots))
    if not numbered:
        raise SchemaError(f"{path}: no rows")
    numbered = [
        (line_no, {**row, "images": [str(Path(p).resolve()) for p in row["images"]]})
        for line_no, row in numbered
    ]
    check_images(path, numbered)
    return [row for _, row in numbered]


def drop_long_rows(
    rows: list[dict], lengths: list[int], max_length: int | None, path
) -> tuple[list[dict], int, list[int]]:
    """(kept rows, how many were dropped, their token lengths), given each row's token length after image
    expansion. Rows longer than max_length tokens are dropped and counted, never truncated."""
    if max_length is None:
        return rows, 0, lengths
    kept = [(row, n) for row, n in zip(rows, lengths, strict=True) if n <= max_length]
    dropped = len(rows) - len(kept)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows longer than max_length=%d tokens (image tokens are never truncated)",
            path,
            dropped,
            len(rows),
            max_length,
        )
    if not kept:
        raise ValueError(f"{path}: every row is longer than max_length={max_length}; raise max_length")
    return [row for row, _ in kept], dropped, [n for _, n in kept]


def _load_images_transform(batch: dict) -> dict:
    batch = dict(batch)
    batch["images"] = [[load_image(p) for p in paths] for paths in batch["images"]]
    return batch


def lazy_images(dataset):
    """Image paths -> PIL images (medllava.processing.load_image) when a row is read, for TRL's DPO/GRPO, whose
    collators want decoded images. Apply last: a later `map` would decode every image once."""
    return dataset.with_transform(_load_images_transform) if dataset is not None else None


def read_rows_for(
    path, processor, script_args, max_length: int | None, kind: str, limit: int | None
) -> tuple[list[dict], list[int], dict]:
    """(rows, their token lengths, report) of one schema JSONL file for an algorithm whose rows are `kind`:
    checked, answer suffixes added if asked, over-long rows dropped and counted."""
    rows = load_rows(path, script_args.image_root, limit, getattr(script_args, "allow_root", ()))
    if getattr(script_args, "answer_suffix", False):
        rows = [add_answer_suffix(row) for row in rows]
    kinds = Counter(row_kind(row) for row in rows)
    if set(kinds) != {kind}:
        raise SchemaError(f"{path}: {kind} rows expected, found {dict(kinds)}")
    # SFT rows get a `length` column for `train_sampling_strategy: group_by_length` (the Trainer reads
    # `length_column_name`; without it the Trainer would look for input_ids, and SFT rows are untokenised here).
    # Other kinds need lengths only to check max_length.
    needs_lengths = kind == "sft" or max_length is not None
    lengths = [token_length(row, processor) for row in rows] if needs_lengths else [0] * len(rows)
    rows, dropped, lengths = drop_long_rows(rows, lengths, max_length, path)
    return (
        rows,
        lengths,
        {"file": str(path), "rows": len(rows) + dropped, "kept": len(rows), "dropped_too_long": dropped},
    )


def get_dataset(
    path,
    processor,
    script_args,
    max_length: int | None,
    kind: str,
    load_images: bool = False,
    length_column: str = "length",
    mixed: bool = False,
):
    """(datasets.Dataset, report) of one schema JSONL file; `kind` is the row kind the algorithm needs.

    SFT keeps image paths (the collator loads them) and gets each row's token length in `length_column` (the
    Trainer's `length_column_name`); DPO/GRPO get PIL images through a lazy transform. `mixed`: add the rows of
    script_args.mix_files (mix_rows).
    """
    from datasets import Dataset

    rows, lengths, report = read_rows_for(
        path, processor, script_args, max_length, kind, script_args.max_train_samples
    )
    if mixed and getattr(script_args, "mix_files", None):
        mix, mix_lengths, reports = mix_rows(script_args, processor, max_length, kind, len(rows))
        rows, lengths, report = rows + mix, lengths + mix_lengths, {**report, "mixed": reports}
        # every row gets every field (None where it has none): datasets takes its columns from the first row
        keys = list(dict.fromkeys(key for row in rows for key in row))
        rows = [{key: row.get(key) for key in keys} for row in rows]
    dataset = Dataset.from_list(rows)
    if kind == "sft":
        if length_column in dataset.column_names:
            raise SchemaError(
                f"{path}: rows already have a {length_column!r} field, the column SFT fills with each row's token "
                "length for group_by_length; rename that field or set length_column_name to another name"
            )
        dataset = dataset.add_column(length_column, lengths)
    if load_images:
        dataset = lazy_images(dataset)
    logger.info("data %s", report)
    return dataset, report


def mix_rows(
    script_args, processor, max_length, kind: str, n_main: int
) -> tuple[list[dict], list[int], list[dict]]:
    """Rows of script_args.mix_files to add to `n_main` rows of train_file, each file its mix_fractions share of
    the whole: round(f / (1 - sum of fractions) * n_main) rows, its first ones (files are shuffled when built),
    repeated in order if the file has fewer. (rows, lengths, one report per file.)"""
    rest = 1 - sum(script_args.mix_fractions)
    rows, lengths, reports = [], [], []
    for path, fraction in zip(script_args.mix_files, script_args.mix_fractions, strict=True):
        want = max(1, round(fraction / rest * n_main))
        file_rows, file_lengths, report = read_rows_for(path, processor, script_args, max_length, kind, want)
        picked = [i % len(file_rows) for i in range(want)]
        rows += [file_rows[i] for i in picked]
        lengths += [file_lengths[i] for i in picked]
        reports.append(
            {**report, "fraction": fraction, "used": want, "passes": round(want / len(file_rows), 2)}
        )
        if want > len(file_rows):
            logger.warning(
                "%s: %d rows repeated to give %d (mix fraction %g)", path, len(file_rows), want, fraction
            )
    return rows, lengths, reports


def get_datasets(
    script_args, processor, max_length, kind: str, load_images: bool = False, length_column: str = "length"
):
    """(train dataset, eval dataset or None, report) from script_args.train_file (with the rows of mix_files
    mixed in, if any) and eval_file. The Trainer's sampler shuffles the mixed rows."""
    train, train_report = get_dataset(
        script_args.train_file,
        processor,
        script_args,
        max_length,
        kind,
        load_images,
        length_column,
        mixed=True,
    )
    report = {"train": train_report}
    evaluation = None
    if script_args.eval_file:
        evaluation, report["eval"] = get_dataset(
            script_args.eval_file, processor, script_args, max_length, kind, load_images, length_column
        )
    return train, evaluation, report
