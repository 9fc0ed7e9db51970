"""Helpers shared by the data-pipeline CLIs: progress, rejected rows, summary tables, image placement,
LLaVA-style `conversations` conversion and the perceptual-hash leakage report.

Nothing here drops a row silently: every converter collects what it cannot convert in a `Rejects` object,
which writes the rows and their reasons to a JSONL file and prints the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medllava.schema import (
    ANSWER_TYPES,
    IMAGE_ROOTS_FILE,
    SchemaError,
    message,
    recorded_image_roots,
    resolve_image,
    write_json,
    write_jsonl,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".nii", ".gz")
IMAGE_MODES = ("copy", "symlink", "relative")


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "row"):
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)


def reason_key(reason: str) -> str:
    """A reason without its row-specific details (paths, positions, numbers), for counting."""
    reason = re.sub(r"^\S*\[\d+\](?: part \d+)?: ", "", reason)
    head, _, rest = reason.partition(": ")
    key = head if len(head) >= 12 or not rest else f"{head}: {rest}"
    return re.sub(r"\d+", "N", key).replace("UTF-N", "UTF-8")


class Rejects:
    """Rows that could not be used, each with where it came from and why; written as JSONL."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, where: str, reasons: str | Sequence[str], row: Any = None) -> None:
        reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        self.items.append({"where": where, "reasons": reasons, "row": row})

    def __len__(self) -> int:
        return len(self.items)

    def reason_counts(self) -> Counter:
        return Counter(reason_key(r) for item in self.items for r in item["reasons"])

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_jsonl(path, (writable(item) for item in self.items))
        return path

    def report(self, path: str | Path | None, label: str = "rejected") -> None:
        """Write the file (if any row was rejected) and print the count and where it went."""
        if not self.items:
            print(f"{label}: 0")
            return
        if path is not None:
            self.write(path)
        print(f"{label}: {len(self.items)} row(s)" + (f", with reasons, in {path}" if path else ""))
        for reason, n in self.reason_counts().most_common(8):
            print(f"  {n:6d}  {reason[:100]}")


def writable(value: Any) -> Any:
    """`value` with every string that cannot be written as UTF-8 (a lone surrogate from a rejected row) shown
    with a backslash escape instead, so the rejects file is always written."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {writable(k): writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [writable(v) for v in value]
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (markdown-compatible) for summaries printed by the CLIs."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def split_summary(splits: dict[str, list[dict]]) -> str:
    """Rows, answer types and distinct images per split."""
    headers = ["split", "rows", *ANSWER_TYPES, "no type", "images"]
    table = []
    for name, rows in splits.items():
        types = Counter(r.get("answer_type") for r in rows)
        images = {p for r in rows for p in r.get("images", [])}
        table.append(
            [name, len(rows), *(types.get(t, 0) for t in ANSWER_TYPES), types.get(None, 0), len(images)]
        )
    return format_table(headers, table)


# ---------------------------------------------------------------------------------------------------------------
# Images: find them in a source layout and place them next to the output rows
# ---------------------------------------------------------------------------------------------------------------


def index_images(root: str | Path) -> dict[str, list[Path]]:
    """File name -> paths of every image file under `root` (official layouts nest images differently)."""
    index: dict[str, list[Path]] = {}
    for path in Path(root).rglob("*"):
        if path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS):
            index.setdefault(path.name, []).append(path)
    return index


def find_image(name: str, input_dir: Path, index: dict[str, list[Path]] | None) -> Path | None:
    """The image file a source row names: its path under `input_dir`, else a unique file of that name."""
    direct = input_dir / name
    if direct.is_file():
        return direct
    if index is None:
        return None
    candidates = index.get(Path(name).name, [])
    if len(candidates) == 1:
        return candidates[0]
    # Several files share the name (e.g. SLAKE's xmlab*/source.jpg): pick the one whose path ends with `name`.
    matches = [c for c in candidates if c.as_posix().endswith("/" + name.lstrip("./"))]
    return matches[0] if len(matches) == 1 else None


class ImageStore:
    """Places source images where the output rows can reach them and returns their row paths.

    copy: OUT/images/<relative name> (self-contained output); symlink: the same, as links;
    relative: no copy, the row path is the source file relative to OUT (for very large sets).
    """

    def __init__(self, out_dir: str | Path, mode: str = "copy", subdir: str = "images"):
        if mode not in IMAGE_MODES:
            raise ValueError(f"image mode {mode!r} is not one of {', '.join(IMAGE_MODES)}")
        self.out_dir = Path(out_dir)
        self.mode = mode
        self.subdir = subdir
        self.placed: dict[str, str] = {}  # source path -> row path

    def add(self, source: Path, name: str) -> str:
        """Place `source` (a file) under the row-relative `name` (used by copy/symlink); return the row path."""
        key = str(source.resolve())
        if key in self.placed:
            return self.placed[key]
        if self.mode == "relative":
            row_path = os.path.relpath(source.resolve(), self.out_dir.resolve())
        else:
            row_path = self._unique(f"{self.subdir}/{_safe_relative(name)}")
            target = self.out_dir / row_path
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            if self.mode == "copy":
                shutil.copyfile(source, target)
            else:
                target.symlink_to(source.resolve())
        self.placed[key] = row_path
        return row_path

    def add_bytes(self, data: bytes, name: str) -> str:
        """Write image bytes (e.g. from a parquet file) as OUT/images/<name>; identical bytes are stored once."""
        key = "sha256:" + hashlib.sha256(data).hexdigest()
        if key in self.placed:
            return self.placed[key]
        row_path = self._unique(f"{self.subdir}/{_safe_relative(name)}")
        target = self.out_dir / row_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.placed[key] = row_path
        return row_path

    def _unique(self, row_path: str) -> str:
        taken = set(self.placed.values())
        if row_path not in taken:
            return row_path
        stem, suffix = os.path.splitext(row_path)
        i = 2
        while f"{stem}_{i}{suffix}" in taken:
            i += 1
        return f"{stem}_{i}{suffix}"


def _safe_relative(name: str) -> str:
    parts = [p for p in Path(name).as_posix().split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "image"


# ---------------------------------------------------------------------------------------------------------------
# LLaVA's `conversations` layout (from human/gpt, "<image>" in the text) -> schema messages
# ---------------------------------------------------------------------------------------------------------------

_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_IMAGE_TAG = re.compile(r"\s*<image>\s*", re.IGNORECASE)


def llava_to_messages(conversations: Any, n_images: int) -> tuple[list[dict], list[str]]:
    """([messages], problems): roles mapped, `<image>` tags turned into placeholders in their turn.

    With no `<image>` tag at all, the image placeholders go into the first user turn.
    """
    if not isinstance(conversations, list) or not conversations:
        return [], ["conversations: missing or empty"]
    messages, problems, tags = [], [], 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            problems.append(f"conversations[{i}]: not an object")
            continue
        role = _LLAVA_ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            problems.append(f"conversations[{i}]: needs 'from' in human/gpt and a string 'value'")
            continue
        n_tags = len(_IMAGE_TAG.findall(value))
        tags += n_tags
        text = _IMAGE_TAG.sub(" ", value).strip()
        messages.append(message(role, text, n_tags))
    if problems:
        return [], problems
    if tags == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            return [], ["conversations: no human turn to attach the image to"]
        first_user["content"][:0] = [{"type": "image"}] * n_images
    elif tags != n_images:
        problems.append(f"{tags} <image> tag(s) in the conversation but {n_images} image(s)")
    return messages, problems


# ---------------------------------------------------------------------------------------------------------------
# Reading source files
# ---------------------------------------------------------------------------------------------------------------


def load_json_records(path: str | Path) -> list[dict]:
    """A JSON array (or an object wrapping one under data/records/annotations/questions/items), or JSON lines
    (.jsonl, or any file holding one object per line) -> list of records, with errors naming file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several top-level values: JSON lines
                raise ValueError(
                    f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                ) from None
        else:
            if isinstance(data, dict):
                wrapped = [
                    data[k]
                    for k in ("data", "records", "annotations", "questions", "items")
                    if isinstance(data.get(k), list)
                ]
                data = wrapped[0] if wrapped else [data]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
            return data
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON line ({e.msg})") from None
    return records


def iter_records(
    records: Sequence[Any], file_name: str, desc: str, rejects: Rejects
) -> Iterator[tuple[str, dict]]:
    """(where, record) for each object in a source file's records, with a progress bar; anything else goes to
    `rejects` as "record is not an object". `where` is "<file_name>[<index>]"."""
    for i, record in enumerate(progress(records, desc)):
        where = f"{file_name}[{i}]"
        if not isinstance(record, dict):
            rejects.add(where, "record is not an object", record)
            continue
        yield where, record


def as_text(value: Any) -> str | None:
    """A source answer/question as text (VQA-RAD has numeric answers); None if missing or empty."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def canonical_answer(answer: str) -> str:
    """Yes/no answers in lower case ('Yes' -> 'yes'); others unchanged."""
    return answer.lower() if answer.strip().lower() in ("yes", "no") else answer


# ---------------------------------------------------------------------------------------------------------------
# Leakage: test images that are (near-)duplicates of train images, by perceptual hash
# ---------------------------------------------------------------------------------------------------------------


def phash_images(paths: Iterable[str | Path], desc: str = "hashing") -> dict[str, int]:
    """Path -> 64-bit perceptual hash (medllava.leakage.image_phash); undecodable files are skipped."""
    from medllava.leakage import image_phash

    hashes = {}
    paths = sorted({str(p) for p in paths})
    for path in progress(paths, desc, unit="img"):
        value = image_phash(path)
        if value is not None:
            hashes[path] = value
    return hashes


def leakage_report(
    train_images: Iterable[str | Path],
    test_images: dict[str, int],
    max_distance: int = 0,
    root: str | Path | None = None,
) -> dict:
    """Test images whose perceptual hash is within `max_distance` bits of a train image's.

    `test_images`: test image path -> number of test questions on it. Paths are reported relative to `root`.
    """
    import numpy as np

    from medllava.leakage import hamming

    train_hashes = phash_images([resolve_image(p, root) for p in train_images], "hashing train images")
    test_hashes = phash_images([resolve_image(p, root) for p in test_images], "hashing test images")
    train_paths = list(train_hashes)
    train_arr = np.array([train_hashes[p] for p in train_paths], dtype=np.uint64)
    rel = (lambda p: os.path.relpath(p, root)) if root is not None else str
    counts = {str(resolve_image(p, root)): n for p, n in test_images.items()}
    pairs = []
    for path, value in test_hashes.items():
        if not len(train_arr):
            break
        distance = hamming(train_arr, value)
        close = np.flatnonzero(distance <= max_distance)
        if close.size:
            pairs.append(
                {
                    "test_image": rel(path),
                    "test_questions": counts.get(path, 0),
                    "train_images": [rel(train_paths[i]) for i in close[np.argsort(distance[close])]],
                    "distance": int(distance[close].min()),
                }
            )
    pairs.sort(key=lambda p: p["test_image"])
    return {
        "method": f"imagehash.phash (64 bit), Hamming distance <= {max_distance}",
        "train_images": len(train_hashes),
        "test_images": len(test_hashes),
        "leaked_test_images": len(pairs),
        "leaked_test_questions": sum(p["test_questions"] for p in pairs),
        "pairs": pairs,
    }


def write_leakage_report(splits: dict[str, list[dict]], out_dir: Path, max_distance: int) -> dict | None:
    """Compare test (and validate) images with train images; write OUT/leakage.json and print a summary.
    A question counts once however many of its images (prior and current, say) are duplicates."""
    if "train" not in splits:
        return None
    train = {p for r in splits["train"] for p in r.get("images", [])}
    report = {}
    for split in ("test", "validate"):
        if split not in splits:
            continue
        questions = Counter(p for r in splits[split] for p in r.get("images", []))
        result = leakage_report(train, dict(questions), max_distance, root=out_dir)
        leaked = {pair["test_image"] for pair in result["pairs"]}
        result["leaked_test_questions"] = sum(
            any(os.path.relpath(resolve_image(p, out_dir), out_dir) in leaked for p in r.get("images", []))
            for r in splits[split]
        )
        report[split] = result
        print(
            f"leakage {split}: {result['leaked_test_images']} of {result['test_images']} {split} images are "
            f"duplicates of train images ({result['leaked_test_questions']} {split} questions); "
            f"{result['method']}"
        )
    write_json(out_dir / "leakage.json", report)
    print(f"leakage report: {out_dir / 'leakage.json'}")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Finishing a converter run
# ---------------------------------------------------------------------------------------------------------------


def unique_id(row_id: str, seen: Counter) -> str:
    """Make an id unique within a run by suffixing repeats (-2, -3 ...); `seen` counts what was issued."""
    seen[row_id] += 1
    return row_id if seen[row_id] == 1 else f"{row_id}-{seen[row_id]}"


def record_image_roots(out_dir: Path, rows: Iterable[dict]) -> list[Path]:
    """Record in OUT/image_roots.json the folders outside OUT that the rows' images resolve into, so that the
    validator, train and eval accept this converter's own output without a flag (see
    medllava.schema.recorded_image_roots). Roots already recorded there are kept. Returns the roots added.

    The root is the deepest folder holding every image that leaves OUT (e.g. the release's image folder behind
    `--images relative` or `symlink`, or the `--image-root` of caption rows); images spread over the whole
    filesystem are recorded folder by folder rather than as `/`.
    """
    out_real = out_dir.resolve()
    parents: set[str] = set()
    for row in rows:
        for image in row.get("images") or []:
            real = Path(os.path.realpath(out_dir / image))
            if not real.is_relative_to(out_real):
                parents.add(str(real.parent))
    if not parents:
        return []
    common = Path(os.path.commonpath(sorted(parents)))
    found = [Path(p) for p in sorted(parents)] if common == Path(common.anchor) else [common]
    try:
        known = recorded_image_roots(out_dir)
    except SchemaError:
        known = []
    new = [root for root in found if not any(root.is_relative_to(k) for k in known)]
    if new:
        entries = [os.path.relpath(root, out_real) for root in known + new]
        write_json(out_dir / IMAGE_ROOTS_FILE, {"roots": entries})
        print(
            f"images outside {out_dir} come from {', '.join(map(str, new))}: recorded in {IMAGE_ROOTS_FILE}"
        )
    return new


def write_splits(
    splits: dict[str, list[dict]],
    out_dir: Path,
    rejects: Rejects,
    leak_distance: int | None = 0,
    source_counts: dict[str, int] | None = None,
) -> None:
    """Write OUT/<split>.jsonl, OUT/rejected.jsonl, print the summary and the leakage report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    print(split_summary(splits))
    if source_counts:
        written = sum(len(r) for r in splits.values())
        print(f"source records: {sum(source_counts.values())}; written: {written}; rejected: {len(rejects)}")
    rejects.report(out_dir / "rejected.jsonl")
    if leak_distance is not None and leak_distance >= 0:
        write_leakage_report(splits, out_dir, leak_distance)
    record_image_roots(out_dir, (row for rows in splits.values() for row in rows))
    print(f"wrote {', '.join(str(out_dir / f'{n}.jsonl') for n in splits)}")


def write_rows(
    path: Path, rows: list[dict], rejects: Rejects, headers: Sequence[str], values: Sequence[Any]
) -> None:
    """Write one schema JSONL file, print a one-row summary table and the rejected rows (written to
    PATH.rejected.jsonl), then where the rows went."""
    write_jsonl(path, rows)
    print(format_table(headers, [values]))
    rejects.report(path.with_suffix(".rejected.jsonl"))
    record_image_roots(path.parent, rows)
    print(f"wrote {path}")


def add_converter_args(parser, image_mode: str = "copy") -> None:
    parser.add_argument("--input", required=True, type=Path, help="directory holding the official release")
    parser.add_argument("--output", required=True, type=Path, help="directory to write <split>.jsonl into")
    parser.add_argument(
        "--images",
        choices=IMAGE_MODES,
        default=image_mode,
        help=f"how images reach the output rows (default: {image_mode})",
    )
    parser.add_argument(
        "--leak-distance",
        type=int,
        default=0,
        help="max Hamming distance of perceptual hashes counted as the same image (default 0; "
        "-1 skips the leakage report)",
    )


def converter_main(
    doc: str,
    convert: Callable[..., tuple[dict[str, list[dict]], Rejects, Any]],
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    convert_args: Callable[[argparse.Namespace], tuple] = lambda args: (),
    finish: Callable[[Any], dict[str, int] | None] = lambda n: {"records": n},
    image_mode: str = "copy",
) -> int:
    """The command line of a converter that writes OUT/<split>.jsonl; returns the exit code.

    Parses the shared flags (add_converter_args) and those `add_args` adds, then runs
    convert(--input, --output, --images, *convert_args(args)) -> (splits, rejects, extra). A missing or malformed
    release prints "error: ..." and exits 2. `finish(extra)` prints any source-specific note and returns the
    source counts for write_splits (by default `extra` is the number of source records). `image_mode` is the
    default of --images.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_converter_args(parser, image_mode)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        splits, rejects, extra = convert(args.input, args.output, args.images, *convert_args(args))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_splits(splits, args.output, rejects, args.leak_distance, finish(extra))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# VQA source records -> schema rows
# ---------------------------------------------------------------------------------------------------------------


class VqaBuilder:
    """Turns (image name, question, answer, type, metadata) from an official VQA release into schema rows,
    placing images with an ImageStore and sending anything unusable, with its reason, to `rejects`."""

    def __init__(self, source: str, input_dir: Path, store: ImageStore, rejects: Rejects):
        self.source = source
        self.input_dir = Path(input_dir)
        self.store = store
        self.rejects = rejects
        self.index: dict[str, list[Path]] | None = None
        self.seen: Counter = Counter()

    def image_path(self, name: str) -> Path | None:
        """The file a record names; names without an extension (PathVQA: 'train_0422') try the usual ones."""
        names = [name]
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            names += [name + ext for ext in (".jpg", ".png", ".jpeg")]
        for candidate in names:
            found = find_image(candidate, self.input_dir, None)
            if found is None:
                if self.index is None:
                    self.index = index_images(self.input_dir)
                found = find_image(candidate, self.input_dir, self.index)
            if found is not None:
                return found
        return None

    def record_row(
        self, where: str, record: dict, image_key: str, metadata: dict[str, str], **values: Any
    ) -> dict | None:
        """`row` for a record holding `qid`, `question`, `answer`, `answer_type` and its image name under
        `image_key` (VQA-RAD, SLAKE). `metadata` maps row keys to record keys, in the rows' key order; `values`
        overrides a row key's value (computed by the caller) in its place."""
        fields = {key: record.get(name) for key, name in metadata.items()} | values
        return self.row(
            where,
            record,
            record.get("qid"),
            record.get(image_key),
            record.get("question"),
            record.get("answer"),
            record.get("answer_type"),
            **fields,
        )

    def row(
        self,
        where: str,
        record: Any,
        source_id: Any,
        image_name: Any,
        question: Any,
        answer: Any,
        answer_type: Any = None,
        image_bytes: bytes | None = None,
        **metadata: Any,
    ) -> dict | None:
        """A schema row, or None (the record and its reasons go to `rejects`). With `image_bytes`, the image
        is written from them under `image_name`; otherwise `image_name` is looked up under the input."""
        from medllava.schema import infer_answer_type, make_vqa_row, normalise_answer_type, validate_structure

        question, answer, image_name = as_text(question), as_text(answer), as_text(image_name)
        problems = [
            f"missing {name}"
            for name, v in (("question", question), ("answer", answer), ("image name", image_name))
            if v is None
        ]
        if problems:
            self.rejects.add(where, problems, record)
            return None
        if image_bytes is not None:
            row_image = self.store.add_bytes(image_bytes, image_name)
        else:
            source_image = self.image_path(image_name)
            if source_image is None:
                self.rejects.add(where, f"image not found: {image_name} under {self.input_dir}", record)
                return None
            row_image = self.store.add(source_image, image_name)
        answer = canonical_answer(answer)
        kind = normalise_answer_type(answer_type) or infer_answer_type(answer)
        row_id = unique_id(f"{self.source}-{as_text(source_id) or len(self.seen)}", self.seen)
        row = make_vqa_row(
            row_id,
            [row_image],
            question,
            answer,
            kind,
            source=self.source,
            **{k: as_text(v) for k, v in metadata.items()},
        )
        problems = validate_structure(row)
        if problems:
            self.rejects.add(where, problems, record)
            return None
        return row
