"""MMXU (Mu et al. 2025, prior and current chest X-rays from MIMIC-CXR) -> schema JSONL with several images per
question and what each one is: OUT/train.jsonl (from MMXU-dev), OUT/test.jsonl (from MMXU-test).

Usage:
    python -m data_pipelines.mmxu --input downloads/MMXU --image-root downloads/mimic-cxr-jpg/2.1.0 \\
        --output data/mmxu

The release (github.com/LinjieMu/MMXU, mirrored on the Hugging Face hub as LinjieMu/MMXU) is two JSON-lines
files. `MMXU-test.jsonl`: 3,000 multiple-choice questions on disease progression, each record `id`,
`content_type` ("no change", "worsen", "improved"), `question`, `options` ({"A": text, ..., "D": text}),
`answer` (the letter), `cur_image_path` and `prior_image_path` (MIMIC-CXR-JPG paths such as
`files/p12/p12658542/s54062690/<dicom_id>.jpg`). `MMXU-dev.jsonl` (the 118k training questions) is withheld
under PhysioNet's terms (empty in the repository); its README documents the same fields plus
`related_region_name`, `explanation`, the reports and region boxes, with `prior_image_path` a list of one or more
paths. Reports, explanations and boxes are not carried over (the reports are MIMIC-CXR's restricted text).

The images are MIMIC-CXR-JPG (credentialed access on PhysioNet). `--image-root` is the folder holding its
`files/` (default: --input, where the release says to link `files`); they are not copied by default
(`--images relative`; the folder is recorded in OUT/image_roots.json) since the set is ~570 GB under its own
licence. Each row:

- `images`: the prior image(s), in the record's order, then the current one; one image placeholder each, in
  that order, at the start of the user turn;
- `image_roles`: [{"role": "prior", "date": ...}, ..., {"role": "current", "date": ...}], one per image;
- the user text: the line of `medllava.image_roles` saying which image is which ("Image 1: prior study
  (2180-05-06). Image 2: current study (2180-07-01)."), the question and the lettered options;
- the answer: the option letter (answer type CHOICE; "(b)", "b." or the option's own text become "B"),
  `choices` (the option texts in letter order, for eval), `question_type` (content_type), `region`
  (related_region_name, dev records) and `source` "mmxu".

Study dates come from MIMIC-CXR-JPG's `mimic-cxr-2.0.0-metadata.csv(.gz)` (StudyDate per dicom_id; MIMIC shifts
each patient's dates into 2100-2200 and keeps the intervals), found beside --image-root or --input or given with
--metadata; without it the rows have roles and no dates. A record is rejected, with its reasons, for a missing
field, options not lettered A, B, C ... in order, an answer that is not one of them, an image not found or
outside the image root, the prior being the current image, or a prior dated after the current study. With both
files present, OUT/leakage.json lists test images whose perceptual hash equals a train image's.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from data_pipelines.common import (
    ImageStore,
    Rejects,
    as_text,
    converter_main,
    iter_records,
    load_json_records,
    unique_id,
)
from medllava.image_roles import ImageInput, with_image_roles
from medllava.schema import CHOICE, make_vqa_row, validate_structure

SOURCE = "mmxu"
# split: official file (MMXU-dev is the development/training split)
FILES = {"train": "MMXU-dev.jsonl", "test": "MMXU-test.jsonl"}
METADATA_NAMES = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")


# ---------------------------------------------------------------------------------------------------------------
# The text of a row: which image is which, the question, the options
# ---------------------------------------------------------------------------------------------------------------


def role_inputs(image_roles: Sequence[dict]) -> list[ImageInput]:
    """The `image_roles` entries of a row as medllava.image_roles inputs (role and date; the label is not said)."""
    return [ImageInput(role=entry.get("role"), date=entry.get("date")) for entry in image_roles]


def question_text(question: str, choices: Sequence[str], image_roles: Sequence[dict]) -> str:
    """The user text: which image is which (medllava.image_roles), the question, then "Options:" and one
    "A. text" line per option (the layout of data_pipelines.preferences' multiple-choice prompts)."""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return with_image_roles(f"{question}\nOptions:\n{options}", role_inputs(image_roles))


# ---------------------------------------------------------------------------------------------------------------
# Record fields
# ---------------------------------------------------------------------------------------------------------------


def parse_options(options: Any) -> tuple[list[str] | None, str | None]:
    """(option texts in letter order, None), or (None, reason): `options` must map "A", "B", ... in order to
    non-empty texts."""
    if not isinstance(options, dict) or not options:
        return None, "missing options"
    keys = [str(k).strip().upper() for k in options]
    expected = list(LETTERS[: len(keys)])
    if sorted(keys) != expected:
        shown = ", ".join(map(str, options))
        return None, f"options must be lettered {', '.join(expected)} (got {shown[:80]})"
    by_letter = {str(k).strip().upper(): as_text(v) for k, v in options.items()}
    empty = [k for k in expected if by_letter[k] is None]
    if empty:
        return None, f"option {', '.join(empty)} has no text"
    return [by_letter[k] for k in expected], None


def answer_letter(answer: str, choices: Sequence[str]) -> tuple[str | None, str | None]:
    """(letter, None) for an answer given as a letter ("B", "(b)", "b.") or as an option's text, else
    (None, reason)."""
    letters = LETTERS[: len(choices)]
    found = _LETTER.fullmatch(answer.strip())
    if found:
        letter = found.group(1).upper()
        if letter in letters:
            return letter, None
        return None, f"answer {answer!r} is not one of the options {', '.join(letters)}"
    texts = [c.strip().lower() for c in choices]
    if answer.strip().lower() in texts:
        return letters[texts.index(answer.strip().lower())], None
    return (
        None,
        f"answer {answer[:60]!r} is neither an option letter ({', '.join(letters)}) nor an option's text",
    )


def prior_paths(value: Any) -> list[str] | None:
    """`prior_image_path`: a path (the test file) or a list of one or more paths (the dev file); None if missing."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    paths = [as_text(v) for v in values]
    return paths if paths and all(paths) else None


def question_type(content_type: Any) -> str | None:
    """content_type as a question type: lower case, single spaces ("No_Change" -> "no change")."""
    text = as_text(content_type)
    return re.sub(r"[\s_]+", " ", text.lower()) if text else None


def dicom_id(image_path: str) -> str:
    """MIMIC-CXR-JPG names each image <dicom_id>.jpg."""
    return PurePosixPath(image_path).stem


# ---------------------------------------------------------------------------------------------------------------
# Study dates from MIMIC-CXR-JPG's metadata
# ---------------------------------------------------------------------------------------------------------------


def find_metadata(explicit: Path | None, folders: Sequence[Path]) -> Path | None:
    """--metadata if given (it must exist), else MIMIC-CXR-JPG's metadata file in the first folder holding one."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"--metadata {explicit}: no such file")
        return explicit
    for folder in folders:
        for name in METADATA_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def study_date(value: str) -> str | None:
    """MIMIC's StudyDate ("21800506", or "21800506.0" after a spreadsheet) as YYYY-MM-DD; None if not a date."""
    text = value.strip().removesuffix(".0")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
    except ValueError:
        return None


def read_study_dates(path: Path, wanted: set[str]) -> tuple[dict[str, str], int]:
    """(dicom_id -> YYYY-MM-DD for the `wanted` ids, how many of them had a StudyDate that is not a date), from a
    MIMIC-CXR-JPG metadata CSV (plain or gzipped) with columns dicom_id and StudyDate."""
    opener = gzip.open if path.name.endswith(".gz") else open
    dates, bad = {}, 0
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "dicom_id" not in columns or "studydate" not in columns:
            raise ValueError(
                f"{path}: expected MIMIC-CXR-JPG metadata with columns dicom_id and StudyDate, got "
                f"{', '.join(reader.fieldnames or [])[:200] or 'no header'}"
            )
        for record in reader:
            key = (record.get(columns["dicom_id"]) or "").strip()
            if key in wanted:
                date = study_date(record.get(columns["studydate"]) or "")
                if date is None:
                    bad += 1
                else:
                    dates[key] = date
    return dates, bad


# ---------------------------------------------------------------------------------------------------------------
# Records -> rows
# ---------------------------------------------------------------------------------------------------------------


class MmxuBuilder:
    """Turns MMXU records into schema rows, placing images with an ImageStore and sending anything unusable,
    with all its reasons, to `rejects`."""

    def __init__(self, image_root: Path, store: ImageStore, rejects: Rejects, dates: dict[str, str]):
        self.image_root = Path(image_root)
        self.store = store
        self.rejects = rejects
        self.dates = dates
        self.seen: Counter = Counter()

    def find(self, name: str) -> tuple[Path | None, str | None]:
        """(file, None) for an image path of a record, or (None, reason). Paths are relative to the image root;
        one starting with files/ is also looked up without it (an --image-root that is MIMIC's files/ itself)."""
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            return None, f"image path must stay inside the image root: {name[:120]!r}"
        candidates = [self.image_root / rel]
        if len(rel.parts) > 1 and rel.parts[0] == "files":
            candidates.append(self.image_root / PurePosixPath(*rel.parts[1:]))
        for candidate in candidates:
            if candidate.is_file():
                return candidate, None
        return None, f"image not found: {name} under {self.image_root}"

    def row(self, where: str, record: dict, tag: str) -> dict | None:
        """A schema row for one record, or None (the record and every reason go to `rejects`)."""
        question, answer = as_text(record.get("question")), as_text(record.get("answer"))
        current, priors = as_text(record.get("cur_image_path")), prior_paths(record.get("prior_image_path"))
        problems = [
            f"missing {name}"
            for name, value in (
                ("question", question),
                ("answer", answer),
                ("cur_image_path", current),
                ("prior_image_path", priors),
            )
            if value is None
        ]
        choices, problem = parse_options(record.get("options"))
        if problem:
            problems.append(problem)
        letter = None
        if choices and answer:
            letter, problem = answer_letter(answer, choices)
            if problem:
                problems.append(problem)
        names = (priors or []) + ([current] if current else [])
        files = []
        for name in names:
            found, problem = self.find(name)
            if problem:
                problems.append(problem)
            files.append(found)
        if current and priors and current in priors:
            problems.append(f"the prior image is the current image: {current}")
        dates = [self.dates.get(dicom_id(name)) for name in names]
        if current and priors and dates[-1]:
            problems += [
                f"prior study dated after the current study: {name} dated {date}, the current one {dates[-1]}"
                for name, date in zip(priors, dates[:-1], strict=True)
                if date and date > dates[-1]
            ]
        if problems:
            self.rejects.add(where, problems, record)
            return None
        roles = ["prior"] * len(priors) + ["current"]
        image_roles = [
            {"role": role} | ({"date": date} if date else {}) for role, date in zip(roles, dates, strict=True)
        ]
        images = [self.store.add(path, name) for path, name in zip(files, names, strict=True)]
        row_id = unique_id(f"{SOURCE}-{tag}-{as_text(record.get('id')) or len(self.seen)}", self.seen)
        row = make_vqa_row(
            row_id,
            images,
            question_text(question, choices, image_roles),
            letter,
            CHOICE,
            image_roles=image_roles,
            choices=choices,
            question_type=question_type(record.get("content_type")),
            region=as_text(record.get("related_region_name")),
            source=SOURCE,
        )
        problems = validate_structure(row)
        if problems:
            self.rejects.add(where, problems, record)
            return None
        return row


def find_release(input_dir: Path) -> dict[str, Path]:
    """split -> the official file of that split in `input_dir` (at least MMXU-test.jsonl or MMXU-dev.jsonl)."""
    found = {split: input_dir / name for split, name in FILES.items() if (input_dir / name).is_file()}
    if not found:
        raise FileNotFoundError(f"{input_dir}: neither {FILES['test']} nor {FILES['train']} found")
    return found


def convert(
    input_dir: Path,
    out_dir: Path,
    image_mode: str = "relative",
    image_root: Path | None = None,
    metadata: Path | None = None,
) -> tuple[dict[str, list[dict]], Rejects, dict]:
    """(splits, rejects, notes): the rows of each official file present; an empty file (the public MMXU-dev)
    gives no split."""
    input_dir = Path(input_dir)
    image_root = Path(image_root) if image_root is not None else input_dir
    records = {split: load_json_records(path) for split, path in find_release(input_dir).items()}
    wanted = {
        dicom_id(name)
        for rs in records.values()
        for r in rs
        if isinstance(r, dict)
        for name in (prior_paths(r.get("prior_image_path")) or []) + [as_text(r.get("cur_image_path")) or ""]
        if name
    }
    metadata = find_metadata(metadata, [image_root, input_dir])
    dates, bad_dates = read_study_dates(metadata, wanted) if metadata is not None else ({}, 0)
    rejects = Rejects()
    builder = MmxuBuilder(image_root, ImageStore(out_dir, image_mode), rejects, dates)
    splits: dict[str, list[dict]] = {}
    for split, split_records in records.items():
        if not split_records:
            continue
        name = FILES[split]
        tag = name.removeprefix("MMXU-").removesuffix(".jsonl").lower()
        rows = [builder.row(where, r, tag) for where, r in iter_records(split_records, name, SOURCE, rejects)]
        splits[split] = [r for r in rows if r is not None]
    notes = {
        "counts": {FILES[split]: len(rs) for split, rs in records.items()},
        "metadata": metadata,
        "dated": len(dates),
        "bad_dates": bad_dates,
        "images": len(wanted),
    }
    return splits, rejects, notes


def finish(notes: dict) -> dict[str, int]:
    """Print where the dates came from and which official files gave no rows; return the source counts."""
    if notes["metadata"] is None:
        print(f"study dates: none (no {METADATA_NAMES[0]} beside --image-root or --input; --metadata FILE)")
    else:
        print(
            f"study dates: {notes['dated']} of {notes['images']} images dated from {notes['metadata']}"
            + (f" ({notes['bad_dates']} StudyDate value(s) not a date)" if notes["bad_dates"] else "")
        )
    for split, name in FILES.items():
        if not notes["counts"].get(name):
            state = "empty" if name in notes["counts"] else "not found"
            print(f"{name}: {state}, no {split} split (MMXU-dev is withheld from the public release)")
    return notes["counts"]


def add_args(parser) -> None:
    parser.add_argument(
        "--image-root",
        type=Path,
        help="the folder holding MIMIC-CXR-JPG's files/ (default: --input)",
    )
    parser.add_argument(
        "--metadata",
        type=Path,
        help="MIMIC-CXR-JPG's mimic-cxr-2.0.0-metadata.csv(.gz) for study dates (default: looked for beside "
        "--image-root, then --input)",
    )


def main(argv=None) -> int:
    return converter_main(
        __doc__,
        convert,
        argv,
        add_args=add_args,
        convert_args=lambda args: (args.image_root, args.metadata),
        finish=finish,
        image_mode="relative",
    )


if __name__ == "__main__":
    sys.exit(main())
