"""Answer every question of a schema JSONL file with batched greedy decoding, writing predictions as it goes.

Usage:
    python -m eval.generate --model default --data data/medsynth/vqa_test.jsonl --output outputs/eval/predictions.jsonl
    python -m eval.generate --model M --data FILE --output P --batch-size 16 --max-new-tokens 32 --limit 100
    python -m eval.generate ... --num-shards 2 --shard-index 0   # one process per shard, separate --output files
    python -m eval.generate ... --shuffle-images 0   # image-blind control: each question gets another picture
    python -m eval.generate ... --shuffle-images 0 --shuffle-role prior    # swap only the prior studies
    python -m eval.generate ... --shuffle-images 0 --shuffle-role volume   # each volume gets another's slices
    python -m eval.generate ... --no-shared-prefix   # recompute every prompt in full (the slower path, same answers)

One JSON line per question (id, question, answer, prediction, answer_type, question_type, modality, n_images,
image_roles, latency_s, model, ...) is appended and flushed after each batch; questions are batched grouped by
answer type and length, so lines come in that order, not the file's (latency_s is the wall time of the
question's batch). Rerunning the same command resumes: ids already in the output are skipped, and a torn last
line (a kill during a write) is cut off. Shard k takes the questions whose index in the file is k modulo the
number of shards. A suffix per answer type is appended to the question (e.g. "Answer yes or no.");
`--no-suffix` asks the bare question. Decoding is greedy, so runs are reproducible.

By default the questions about one image share the prompt prefix (system prompt, image, anything before the
question): it runs through the model once per image and its KV cache serves every question about it
(`medllava.generation.generate_shared`). Questions are then taken in chunks of whole images (`--prefix-chunk`
questions at most), batched within a chunk by answer type and length; the first batch of a chunk also carries
the chunk's prefix computation in its latency_s. The answers are those of `--no-shared-prefix`, which batches
the full prompts over the whole shard instead.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from eval.score import image_family
from medllava.assets import resolve_model
from medllava.generation import Completion, batch_key, shared_prefix_order
from medllava.prompts import ANSWER_SUFFIXES, extract_answer, with_suffix
from medllava.schema import (
    SchemaError,
    infer_answer_type,
    prompt_messages,
    read_valid_rows,
    vqa_answer,
    vqa_question,
)

METADATA = ("question_type", "modality", "source")


class PredictionsFileError(ValueError):
    """An existing predictions file cannot be resumed; the message names the file, line and reason."""


@dataclass
class Question:
    id: str
    index: int  # position in the data file (sharding key)
    line: int
    images: list[Path]
    messages: list[dict]  # what the model is asked (suffix included)
    question: str
    answer: str
    answer_type: str
    answer_type_inferred: bool
    metadata: dict
    image_roles: list[str | None] | None = None  # the role of each image ("prior", "current" or None)


# ---------------------------------------------------------------------------------------------------------------
# Reading questions
# ---------------------------------------------------------------------------------------------------------------


def load_questions(
    data: Path, image_root: Path | None, suffixes: dict[str, str], limit: int | None = None
) -> list[Question]:
    """Every question of a schema file; a row that cannot be evaluated raises SchemaError naming file:line."""
    questions, seen = [], {}
    for line_no, row in read_valid_rows(data, image_root, limit=limit):
        where = f"{data}:{line_no}"
        if "chosen" in row:
            raise SchemaError(f"{where}: a DPO row is not a VQA question")
        row_id = row["id"]
        if row_id in seen:
            raise SchemaError(f"{where}: duplicate id {row_id!r} (first on line {seen[row_id]})")
        seen[row_id] = line_no
        # the gold reply may state its finding before the verdict: both sides are scored on the final answer
        answer = extract_answer(vqa_answer(row))
        answer_type = row.get("answer_type")
        inferred = answer_type is None
        if inferred:
            answer_type = infer_answer_type(answer)
        messages = prompt_messages(row)
        questions.append(
            Question(
                id=row_id,
                index=len(questions),
                line=line_no,
                images=[Path(p) for p in row["images"]],
                messages=with_suffix(messages, suffixes.get(answer_type, "")),
                question=vqa_question(row),
                answer=answer,
                answer_type=answer_type,
                answer_type_inferred=inferred,
                metadata={k: row[k] for k in METADATA if k in row},
                image_roles=[e.get("role") for e in row["image_roles"]] if "image_roles" in row else None,
            )
        )
    return questions


def shuffle_images(questions: list[Question], seed: int) -> list[Question]:
    """Image-blind control: every question gets the images of questions about another picture.

    The distinct image lists (grouped by how many images they hold) are put in a seeded random order and each is
    replaced by the next one in that cycle, so no question keeps its own picture even when several questions share
    one. Scoring such a run measures what the model answers from the question text and answer priors alone; the
    gap to the normal run is what the model reads from the image.
    """
    distinct: dict[int, list[tuple[Path, ...]]] = {}
    for q in questions:
        key = tuple(q.images)
        group = distinct.setdefault(len(key), [])
        if key and key not in group:
            group.append(key)
    replacement = {}
    for group in distinct.values():
        if len(group) < 2:
            raise SchemaError("--shuffle-images needs at least two different images among the questions")
        random.Random(seed).shuffle(group)
        replacement.update({key: group[(i + 1) % len(group)] for i, key in enumerate(group)})
    return [replace(q, images=list(replacement.get(tuple(q.images), q.images))) for q in questions]


def shuffle_priors(questions: list[Question], seed: int) -> list[Question]:
    """Comparison control: every prior image is replaced by another question's prior; the other images stay.

    The distinct prior images (those whose `image_roles` entry is "prior") go in a seeded random cycle, each
    replaced by the next, so every question with a prior gets one from another pair (of any modality) and
    keeps its current image; questions without a prior are unchanged. A model that compares the two studies
    loses accuracy here; one that reads only the current image does not.
    """
    priors: list[Path] = []
    for q in questions:
        for path, role in zip(q.images, q.image_roles or (), strict=False):
            if role == "prior" and path not in priors:
                priors.append(path)
    if len(priors) < 2:
        raise SchemaError(
            "--shuffle-role prior needs at least two different prior images (image_roles 'prior') among the "
            f"questions, found {len(priors)}"
        )
    random.Random(seed).shuffle(priors)
    replacement = {path: priors[(i + 1) % len(priors)] for i, path in enumerate(priors)}
    out = []
    for q in questions:
        roles = q.image_roles or [None] * len(q.images)
        images = [replacement[p] if r == "prior" else p for p, r in zip(q.images, roles, strict=True)]
        out.append(replace(q, images=images))
    return out


def _resample(slices: tuple[Path, ...], n: int) -> tuple[Path, ...]:
    """`n` >= 2 evenly spaced slices of a volume, the first and last included (repeated if it has fewer)."""
    return tuple(slices[round(i * (len(slices) - 1) / (n - 1))] for i in range(n))


def shuffle_volumes(questions: list[Question], seed: int) -> list[Question]:
    """Volume control: the whole set of slices of every volume row comes from another volume row.

    Volume rows are those of several images none of which is a prior (`eval.score.image_family`). The distinct
    slice lists of each slice count go in a seeded random cycle, each replaced by the next, so no row keeps
    its own volume and the count of images (the prompt's placeholders and its "Images 1-N" line) is unchanged.
    A slice count held by a single volume takes the slices of a seeded pick among the volumes of the nearest
    other count (the larger on a tie), resampled to its count: evenly spaced, repeating slices when the donor
    has fewer. Other rows are unchanged.
    """
    volumes: dict[int, list[tuple[Path, ...]]] = {}
    for q in questions:
        if image_family(len(q.images), q.image_roles) == "volume":
            key = tuple(q.images)
            group = volumes.setdefault(len(key), [])
            if key not in group:
                group.append(key)
    found = sum(len(g) for g in volumes.values())
    if found < 2:
        raise SchemaError(
            "--shuffle-role volume needs at least two different volumes (rows of several images, none a "
            f"prior) among the questions, found {found}"
        )
    rng = random.Random(seed)
    replacement = {}
    for count in sorted(volumes):
        group = volumes[count]
        if len(group) >= 2:
            rng.shuffle(group)
            replacement.update({key: group[(i + 1) % len(group)] for i, key in enumerate(group)})
    for count in sorted(volumes):
        if len(volumes[count]) == 1:
            donor_count = min((c for c in volumes if c != count), key=lambda c: (abs(c - count), -c))
            donor = volumes[donor_count][rng.randrange(len(volumes[donor_count]))]
            replacement[volumes[count][0]] = _resample(donor, count)
    return [replace(q, images=list(replacement.get(tuple(q.images), q.images))) for q in questions]


# --shuffle-role -> (function, what the model name records, what the log says)
CONTROLS = {
    None: (shuffle_images, "images shuffled", "images shuffled across questions"),
    "prior": (shuffle_priors, "prior images shuffled", "each prior study replaced by another question's"),
    "volume": (shuffle_volumes, "volumes shuffled", "each volume's slices replaced by another volume's"),
}


def shard(questions: list[Question], num_shards: int, shard_index: int) -> list[Question]:
    return [q for q in questions if q.index % num_shards == shard_index]


def _batch_key(q: Question) -> tuple:
    return batch_key(q.answer_type, len(q.images), q.question)


def batch_order(questions: list[Question]) -> list[Question]:
    return sorted(questions, key=lambda q: (_batch_key(q), q.index))


def shared_order(questions: list[Question], chunk_size: int) -> list[list[Question]]:
    """Chunks of whole images (at most `chunk_size` questions; more questions about one image are split), each in
    batch order: the prefixes of a chunk's images are computed once and kept while its batches run."""
    chunks = shared_prefix_order(
        [tuple(q.images) for q in questions], [_batch_key(q) for q in questions], chunk_size
    )
    return [[questions[i] for i in chunk] for chunk in chunks]


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------


def read_done(output: Path, model: str) -> set[str]:
    """Ids already answered in `output`. A torn last line (no newline: a kill during a write) is cut off the
    file; a malformed complete line, or answers from another model, raise PredictionsFileError."""
    if not output.exists():
        return set()
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (empty if none)
    done = set()
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionsFileError(
                f"{output}:{i}: malformed JSON line ({e.msg}); not a predictions file?"
            ) from None
        if not isinstance(row, dict) or "id" not in row:
            raise PredictionsFileError(f"{output}:{i}: not a prediction row (no 'id')")
        if row.get("model") != model:
            raise PredictionsFileError(
                f"{output}:{i}: predictions of model {row.get('model')!r}, not {model!r}: "
                "use another --output or delete the file"
            )
        done.add(row["id"])
    if tail.strip():
        cut = len(raw) - len(tail)
        with output.open("r+b") as f:
            f.truncate(cut)
        print(f"[eval.generate] {output}: cut off a torn last line ({len(tail)} bytes)", file=sys.stderr)
    return done


# ---------------------------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------------------------


def prediction_row(q: Question, completion, latency: float, batch_size: int, model: str) -> dict:
    return {
        "id": q.id,
        "question": q.question,
        "answer": q.answer,
        "prediction": completion.text,
        "answer_type": q.answer_type,
        "question_type": q.metadata.get("question_type"),
        "modality": q.metadata.get("modality"),
        "source": q.metadata.get("source"),
        "n_images": len(q.images),
        "image_roles": q.image_roles,
        "latency_s": round(latency, 4),
        "batch_size": batch_size,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "finish_reason": completion.finish_reason,
        "model": model,
    }


def error_row(q: Question, error: str, model: str) -> dict:
    row = prediction_row(q, Completion("", 0, 0, "error"), 0.0, 0, model)
    row["error"] = error
    return row


def answer_batch(model, processor, batch: list[Question], max_new_tokens: int, model_name: str) -> list[dict]:
    """Answer one batch; a question whose image does not load gets an error row (scored as wrong, counted)."""
    from medllava.generation import generate
    from medllava.processing import ImageLoadError, load_image

    rows, examples, ok = {}, [], []
    for q in batch:
        try:
            images = [load_image(p) for p in q.images]
        except ImageLoadError as e:
            rows[q.id] = error_row(q, str(e), model_name)
            continue
        examples.append({"images": images, "messages": q.messages})
        ok.append(q)
    if examples:
        start = time.perf_counter()
        completions = generate(model, processor, examples, images_loaded=True, max_new_tokens=max_new_tokens)
        latency = time.perf_counter() - start
        for q, c in zip(ok, completions, strict=True):
            rows[q.id] = prediction_row(q, c, latency, len(examples), model_name)
    return [rows[q.id] for q in batch]


def answer_shared(
    model, processor, chunk: list[Question], batch_size: int, max_new_tokens: int, model_name: str
) -> Iterator[list[dict]]:
    """Answer a chunk of questions with shared prefixes, yielding each batch's rows; each image file is loaded once,
    and the questions whose images do not load come first as error rows (scored as wrong, counted)."""
    from medllava.generation import generate_shared
    from medllava.processing import ImageLoadError, load_image

    loaded, errors, examples, ok = {}, [], [], []
    for q in chunk:
        try:
            for path in q.images:
                if path not in loaded:
                    loaded[path] = load_image(path)
        except ImageLoadError as e:
            errors.append(error_row(q, str(e), model_name))
            continue
        examples.append({"images": [loaded[p] for p in q.images], "messages": q.messages})
        ok.append(q)
    if errors:
        yield errors
    start = time.perf_counter()
    for first, completions in generate_shared(
        model, processor, examples, images_loaded=True, batch_size=batch_size, max_new_tokens=max_new_tokens
    ):
        latency = time.perf_counter() - start
        batch = ok[first : first + len(completions)]
        yield [
            prediction_row(q, c, latency, len(batch), model_name)
            for q, c in zip(batch, completions, strict=True)
        ]
        start = time.perf_counter()


def run(args: argparse.Namespace) -> dict:
    from medllava.generation import load

    model_dir = resolve_model(args.model)
    model_name = args.model_name or str(model_dir)
    if args.shuffle_images is not None:  # a control run never resumes into (or from) a normal run's file
        model_name += f" [{CONTROLS[args.shuffle_role][1]}, seed {args.shuffle_images}]"
    suffixes = {"CLOSED": args.closed_suffix, "OPEN": args.open_suffix, "CHOICE": args.choice_suffix}
    if args.no_suffix:
        suffixes = {}
    questions = load_questions(
        Path(args.data), args.image_root and Path(args.image_root), suffixes, args.limit
    )
    if args.shuffle_images is not None:
        control, _, what = CONTROLS[args.shuffle_role]
        real, questions = questions, control(questions, args.shuffle_images)
        changed = sum(s.images != q.images for s, q in zip(questions, real, strict=True))
        print(
            f"[eval.generate] control: {what} (seed {args.shuffle_images}); "
            f"{changed} of {len(questions)} question(s) changed",
            file=sys.stderr,
        )
    mine = shard(questions, args.num_shards, args.shard_index)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output, model_name)
    ids = {q.id for q in mine}
    foreign = done - ids
    if foreign:
        note = f"{len(foreign)} answered id(s) are not in this shard of {args.data}"
        print(f"[eval.generate] {output}: {note}", file=sys.stderr)
    todo = batch_order([q for q in mine if q.id not in done])
    inferred = sum(q.answer_type_inferred for q in mine)
    if inferred:
        print(
            f"[eval.generate] {inferred} row(s) without answer_type: inferred from the answer",
            file=sys.stderr,
        )
    where = f"shard {args.shard_index}/{args.num_shards}"
    progress = f"{len(mine) - len(todo)} already answered, {len(todo)} to go"
    print(f"[eval.generate] {len(mine)} question(s) in {where}, {progress}", file=sys.stderr)
    errors = 0
    if todo:
        model, processor = load(str(model_dir), dtype=args.dtype, device=args.device)
        if args.shared_prefix:
            batches = (
                rows
                for chunk in shared_order([q for q in mine if q.id not in done], args.prefix_chunk)
                for rows in answer_shared(
                    model, processor, chunk, args.batch_size, args.max_new_tokens, model_name
                )
            )
        else:
            batches = (
                answer_batch(
                    model, processor, todo[start : start + args.batch_size], args.max_new_tokens, model_name
                )
                for start in range(0, len(todo), args.batch_size)
            )
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="q", desc="answering", smoothing=0.1)
        with output.open("a", encoding="utf-8") as f:
            for rows in batches:
                errors += sum("error" in r for r in rows)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                bar.update(len(rows))
        bar.close()
    summary = {
        "output": str(output),
        "questions": len(mine),
        "answered_now": len(todo),
        "already_answered": len(mine) - len(todo),
        "image_errors": errors,
    }
    if errors:
        print(
            f"[eval.generate] {errors} question(s) had images that did not load: written with an 'error' "
            "field and an empty prediction (scored as wrong)",
            file=sys.stderr,
        )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="'default' (the starter or base model) or a Llava directory"
    )
    p.add_argument("--data", required=True, help="schema JSONL file of VQA rows")
    p.add_argument("--output", required=True, help="predictions JSONL (appended to; resumed if it exists)")
    p.add_argument("--image-root", help="directory image paths are relative to (default: the data file's)")
    p.add_argument("--model-name", help="name recorded in the 'model' field (default: the model directory)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="questions answered together (default: 64, or 16 with --no-shared-prefix)",
    )
    p.add_argument(
        "--no-shared-prefix",
        dest="shared_prefix",
        action="store_false",
        help="recompute each prompt in full instead of sharing the prefix of questions about one image",
    )
    p.add_argument(
        "--prefix-chunk",
        type=int,
        default=128,
        help="questions (whole images) whose prefixes are kept in memory together",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N questions of the file (before sharding)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--closed-suffix", default=ANSWER_SUFFIXES["CLOSED"], help="appended to CLOSED questions")
    p.add_argument("--open-suffix", default=ANSWER_SUFFIXES["OPEN"], help="appended to OPEN questions")
    p.add_argument("--choice-suffix", default=ANSWER_SUFFIXES["CHOICE"], help="appended to CHOICE questions")
    p.add_argument("--no-suffix", action="store_true", help="ask the questions exactly as written")
    p.add_argument(
        "--shuffle-images",
        type=int,
        metavar="SEED",
        help="image-blind control: ask each question about another question's picture",
    )
    p.add_argument(
        "--shuffle-role",
        choices=[c for c in CONTROLS if c],
        help="with --shuffle-images: replace only the prior images (the current ones stay), or only the "
        "slices of volume rows (by another volume's, same count)",
    )
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.shared_prefix else 16
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.prefix_chunk < 1:
        p.error("--batch-size, --max-new-tokens and --prefix-chunk must be >= 1")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index must be in [0, {args.num_shards}) and --num-shards >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.shuffle_role and args.shuffle_images is None:
        p.error("--shuffle-role needs --shuffle-images SEED")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (SchemaError, PredictionsFileError, FileNotFoundError) as e:
        sys.exit(f"eval.generate: error: {e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
