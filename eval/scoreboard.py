"""Scoreboard: every test set present, answered once, scored under every harness's protocol, with controls.

Usage:
    python -m eval.scoreboard --model default                      # = make scoreboard MODEL=default
    python -m eval.scoreboard --model default --model outputs/starter/dpo --output outputs/scoreboard
    python -m eval.scoreboard --model M --limit 48 --sets medsynth  # a quick look
    python -m eval.scoreboard --model M --num-shards 2 --shard-index 0   # one process per shard; then --score-only
    python -m eval.scoreboard --model M --judge http://127.0.0.1:8000/v1 --exclude-leaked
    python -m eval.scoreboard --model M --set mine=data/mine/test.jsonl --train-data data/mine/train.jsonl

For each model and each test set (data/medsynth/vqa_test.jsonl always; data/vqa_rad, slake, pathvqa, pmc_vqa
test.jsonl and data/llava_med_*/test.jsonl when converted there; --set adds others) it answers three times
through eval.generate (resumable, shardable): the real images, the image-blind control (each question asked
about another question's picture, eval.generate --shuffle-images SEED) and the noise control (each image
replaced by seeded uniform noise of the same size, written to OUT/sets/SET/noise-seedS/). The question-only
prior (the most frequent train answer for the question's wording, where a train split sits beside the test
file) is scored as a fourth run. Every run is scored under every protocol of eval.protocols, with seeded
bootstrap 95% CIs; "reads the image" is the paired gap real - control with its bootstrap CI.

Before scoring, each test set is checked for leakage against the model's training files (the `file` entries of
MODEL/train_report.json, or --train-data; failing both, the *train*.jsonl files beside the test file):
perceptual-hash (near-)duplicate images and normalised question-answer pairs that occur in training.
--exclude-leaked [KINDS] scores without those questions (kinds: images, qa_pairs; default both).

Writes OUT/scoreboard.md (also printed), OUT/scoreboard.json and OUT/scoreboard.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from eval import generate
from eval.protocols import (
    PROTOCOLS,
    dataset_of,
    get_protocols,
    notes_of,
    pooled_by_id,
    score_protocol,
    split_values,
)
from eval.score import bootstrap_ci, mean_ci, percent_cell
from medllava.leakage import hamming, image_phash
from medllava.schema import (
    SchemaError,
    content_text,
    normalise_text,
    read_jsonl,
    resolve_image,
    row_messages,
    write_json,
    write_jsonl,
)

KNOWN_SETS = {  # name: test file, as the data_pipelines converters write them
    "medsynth": "data/medsynth/vqa_test.jsonl",
    "vqa_rad": "data/vqa_rad/test.jsonl",
    "slake": "data/slake/test.jsonl",
    "pathvqa": "data/pathvqa/test.jsonl",
    "pmc_vqa": "data/pmc_vqa/test.jsonl",
}
LLAVA_MED_GLOB = "data/llava_med_*/test.jsonl"  # data_pipelines.llava_med_eval --output data/llava_med_<set>
RUNS = ("real", "shuffled", "noise", "prior")
RUN_LABELS = {
    "real": "real",
    "shuffled": "images shuffled",
    "noise": "noise image",
    "prior": "question-only prior",
}
CONTROLS = ("shuffled", "noise")
LEAK_KINDS = ("images", "qa_pairs")
SPLITS = ("closed", "open", "overall")


# ---------------------------------------------------------------------------------------------------------------
# Test sets
# ---------------------------------------------------------------------------------------------------------------


def discover_sets(extra: list[str], only: list[str] | None, root: Path = Path(".")) -> dict[str, Path]:
    """{name: test file}: the known locations that exist (medsynth is required), plus NAME=FILE extras."""
    sets = {}
    for name, rel in KNOWN_SETS.items():
        if (root / rel).is_file():
            sets[name] = root / rel
    for path in sorted(root.glob(LLAVA_MED_GLOB)):
        sets[path.parent.name] = path
    for spec in extra:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--set {spec!r}: expected NAME=FILE")
        if not Path(file).is_file():
            raise FileNotFoundError(f"--set {spec}: no such file {file}")
        sets[name] = Path(file)
    if only:
        missing = [n for n in only if n not in sets]
        if missing:
            raise FileNotFoundError(
                f"--sets: {', '.join(missing)} not found (present: {', '.join(sets) or 'none'}; converters write "
                "data/<set>/test.jsonl, see docs/data.md)"
            )
        sets = {n: sets[n] for n in only}
    elif "medsynth" not in sets and not extra:
        raise FileNotFoundError(f"{KNOWN_SETS['medsynth']} not found: run 'make data' first")
    return sets


def train_split_of(test_file: Path) -> Path | None:
    """The train split beside a test file (vqa_test.jsonl -> vqa_train.jsonl, test.jsonl -> train.jsonl)."""
    candidate = test_file.with_name(test_file.name.replace("test", "train"))
    return candidate if candidate != test_file and candidate.is_file() else None


def qa_pairs(row: dict) -> list[tuple[str, str]]:
    """(question, answer) of every user -> assistant exchange of a row (GRPO rows: prompt -> solution)."""
    if not isinstance(row.get("messages", row.get("prompt")), list):
        return []
    if "solution" in row and "prompt" in row:
        users = [m for m in row["prompt"] if m.get("role") == "user"]
        return [(content_text(users[-1].get("content", "")), str(row["solution"]))] if users else []
    pairs, question = [], None
    for m in row_messages(row):
        if m.get("role") == "user":
            question = content_text(m.get("content", ""))
        elif m.get("role") == "assistant" and question is not None:
            pairs.append((question, content_text(m.get("content", ""))))
            question = None
    return pairs


def qa_key(question: str, answer: str) -> tuple[str, str]:
    return normalise_text(" ".join(question.split())), normalise_text(answer)


# ---------------------------------------------------------------------------------------------------------------
# Controls: noise images and the question-only prior
# ---------------------------------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[tuple[int, int], int]:
    """((width, height), channels) of an image, through PIL or, for DICOM/NIfTI, medllava's loader."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size, 1 if im.mode in ("1", "L", "I", "I;16", "F", "P;L") else 3
    except Exception:  # noqa: BLE001 - not a PIL format (DICOM, NIfTI): the project's loader reads it
        from medllava.processing import load_image

        return load_image(path).size, 3


def noise_image(size: tuple[int, int], channels: int, seed: int, index: int):
    """Seeded uniform noise of the given size (one generator per image: the same picture on every rerun)."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    width, height = size
    shape = (height, width) if channels == 1 else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if channels == 1 else "RGB")


def write_noise_set(test_file: Path, out_dir: Path, seed: int) -> Path:
    """A copy of the test file whose every image is replaced by a seeded noise picture of the same size (one
    per distinct image, so questions that shared a picture share its noise). Existing noise files are kept."""
    rows = [row for _, row in read_jsonl(test_file)]
    distinct = sorted({p for r in rows for p in r.get("images", [])})
    index = {p: i for i, p in enumerate(distinct)}
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for p, i in index.items():
        target = out_dir / "images" / f"noise-{i:05d}.png"
        size, channels = image_size(resolve_image(p, test_file.parent))
        # Kept only while it still matches its source (a rebuilt test set may change the sizes).
        if not target.is_file() or image_size(target) != (size, channels):
            tmp = target.with_suffix(".tmp.png")
            noise_image(size, channels, seed, i).save(tmp)
            tmp.replace(target)
    noisy = [{**r, "images": [f"images/noise-{index[p]:05d}.png" for p in r.get("images", [])]} for r in rows]
    path = out_dir / "test_noise.jsonl"
    write_jsonl(path, noisy)
    return path


def prior_predictions(questions: list, train_file: Path) -> tuple[list[dict], dict]:
    """Prediction rows that answer each test question with the most frequent train answer for its wording (the
    same normalised question text), else the most frequent train answer of its answer type."""
    by_question: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    for _, row in read_jsonl(train_file):
        answer_type = row.get("answer_type")
        for question, answer in qa_pairs(row):
            key, _ = qa_key(question, answer)
            by_question.setdefault(key, Counter())[answer.strip()] += 1
            by_type.setdefault(answer_type, Counter())[answer.strip()] += 1
    rows, matched = [], 0
    for q in questions:
        key, _ = qa_key(q.question, "")
        if key in by_question:
            answer, matched = by_question[key].most_common(1)[0][0], matched + 1
        elif by_type.get(q.answer_type):
            answer = by_type[q.answer_type].most_common(1)[0][0]
        else:
            answer = ""
        rows.append(
            {
                "id": q.id,
                "question": q.question,
                "answer": q.answer,
                "prediction": answer,
                "answer_type": q.answer_type,
                **q.metadata,
            }
        )
    return rows, {"train_file": str(train_file), "matched_wording": matched, "questions": len(questions)}


# ---------------------------------------------------------------------------------------------------------------
# Leakage
# ---------------------------------------------------------------------------------------------------------------


def model_train_files(model_dir: Path, given: list[str] | None) -> tuple[list[Path], str]:
    """(training files, where they came from): --train-data, else the `file` entries of train_report.json."""
    if given:
        missing = [f for f in given if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"--train-data: no such file(s): {', '.join(missing)}")
        return [Path(f) for f in given], "--train-data"
    report = model_dir / "train_report.json"
    if report.is_file():
        files: list[str] = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "file" and isinstance(value, str):
                        files.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(json.loads(report.read_text(encoding="utf-8")))
        found = [Path(f) for f in dict.fromkeys(files) if Path(f).is_file()]
        if found:
            return found, f"{report}"
    return [], "none"


class HashCache:
    """64-bit perceptual hashes (imagehash.phash over medllava's loader), cached on disk by path, size, mtime."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.dirty = False

    def get(self, image: Path) -> int | None:
        try:
            stat = image.stat()
        except OSError:
            return None
        key = f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.data:
            self.data[key] = image_phash(image)
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.data)
            self.dirty = False


def check_leakage(
    test_file: Path, question_ids: set[str], train_files: list[Path], hashes: HashCache, max_distance: int
) -> dict:
    """Test questions whose image is within `max_distance` phash bits of a training image, whose normalised
    (question, answer) pair occurs in training, and whose pair occurs on such a duplicate image."""
    train_images: dict[Path, set] = {}
    train_qa: set = set()
    for file in train_files:
        for _, row in read_jsonl(file):
            keys = {qa_key(q, a) for q, a in qa_pairs(row)}
            train_qa |= keys
            for p in row.get("images", []):
                train_images.setdefault(resolve_image(p, file.parent).resolve(), set()).update(keys)
    train_paths = [p for p in train_images if hashes.get(p) is not None]
    train_hash = np.array([hashes.get(p) for p in train_paths], dtype=np.uint64)
    by_kind = {"images": set(), "qa_pairs": set(), "image_and_qa": set()}
    test_images, leaked_images, exact_images = set(), set(), set()
    for _, row in read_jsonl(test_file):
        if row.get("id") not in question_ids:
            continue
        pairs = {qa_key(q, a) for q, a in qa_pairs(row)[-1:]}
        if pairs & train_qa:
            by_kind["qa_pairs"].add(row["id"])
        for p in row.get("images", []):
            path = resolve_image(p, test_file.parent).resolve()
            test_images.add(path)
            value = hashes.get(path)
            if value is None or not len(train_hash):
                continue
            distance = hamming(train_hash, value)
            close = np.flatnonzero(distance <= max_distance)
            if close.size:
                leaked_images.add(path)
                if distance.min() == 0:
                    exact_images.add(path)
                by_kind["images"].add(row["id"])
                if any(pairs & train_images[train_paths[i]] for i in close):
                    by_kind["image_and_qa"].add(row["id"])
    hashes.save()
    return {
        "train_files": [str(f) for f in train_files],
        "method": f"imagehash.phash (64 bit), Hamming distance <= {max_distance}; QA pairs lowercased, "
        "whitespace collapsed, trailing punctuation dropped",
        "train_images": len(train_paths),
        "test_images": len(test_images),
        "duplicate_images": len(leaked_images),
        "identical_hash_images": len(exact_images),
        "questions": {kind: len(ids) for kind, ids in by_kind.items()},
        "ids": {kind: sorted(ids) for kind, ids in by_kind.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# Answering (eval.generate) and reading predictions
# ---------------------------------------------------------------------------------------------------------------


def predictions_file(run_dir: Path, num_shards: int, shard_index: int) -> Path:
    name = "predictions.jsonl" if num_shards == 1 else f"predictions.shard{shard_index}-of-{num_shards}.jsonl"
    return run_dir / name


def answer(
    model: str, model_dir: Path, data: Path, run_dir: Path, run: str, args: argparse.Namespace
) -> dict:
    """One eval.generate run (resumes what is already answered)."""
    argv = [
        "--model",
        model,
        "--data",
        str(data),
        "--output",
        str(predictions_file(run_dir, args.num_shards, args.shard_index)),
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--num-shards",
        str(args.num_shards),
        "--shard-index",
        str(args.shard_index),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if run == "shuffled":
        argv += ["--shuffle-images", str(args.seed)]
    if run == "noise":
        argv += ["--model-name", f"{model_dir} [noise images, seed {args.seed}]"]
    return generate.run(generate.parse_args(argv))


def check_current(rows: list[dict], questions: list, run_dir: Path, test_file: Path) -> None:
    """Refuse predictions made for another version of the test file (same ids, other questions or answers):
    eval.generate resumes by id, so they would never be answered again."""
    current = {q.id: (q.question, q.answer) for q in questions}
    stale = [r["id"] for r in rows if (r.get("question"), r.get("answer")) != current.get(r["id"])]
    if stale:
        raise ValueError(
            f"{run_dir}: {len(stale)} of {len(rows)} predictions were answered for another version of {test_file} "
            f"(question or answer differ, e.g. id {stale[0]!r}); delete that directory or use another --output"
        )


def read_run(run_dir: Path) -> list[dict]:
    """Prediction rows of every shard file of a run (first answer per id; a torn last line is ignored)."""
    rows, seen = [], set()
    for path in sorted(run_dir.glob("predictions*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row and row["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def score_run(rows: list[dict], dataset: str, protocols, seed: int, n_boot: int) -> tuple[dict, dict]:
    """({protocol: {closed, open, overall, pooled, notes}}, {protocol: {id: pooled value}})."""
    summary, pooled = {}, {}
    for protocol in protocols:
        scores = score_protocol(protocol, rows, dataset)
        values = split_values(scores)
        summary[protocol.name] = {key: mean_ci(values[key], seed, n_boot) for key in (*SPLITS, "pooled")}
        summary[protocol.name]["notes"] = notes_of(scores)
        pooled[protocol.name] = pooled_by_id(scores)
    return summary, pooled


def paired_gap(real: dict[str, float], control: dict[str, float], seed: int, n_boot: int) -> dict | None:
    """Mean of (real - control) over the questions both scored, with a paired bootstrap 95% CI."""
    ids = sorted(set(real) & set(control))
    if not ids:
        return None
    diff = np.array([real[i] - control[i] for i in ids], dtype=np.float64)
    low, high = bootstrap_ci(diff, seed, n_boot)
    return {"mean": float(diff.mean()), "ci95": [low, high], "n": len(ids)}


def judge_run(rows: list[dict], args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    """Judge every question of a run; ({id: hit}, summary)."""
    from eval.judge import Judge

    judge = Judge(args.judge, out / "judge_cache", args.judge_model, args.judge_api_key)
    verdicts = judge.judge_rows(rows, desc="judging")
    hits = {qid: v.hit for qid, v in verdicts.items()}
    by_type = {t: [hits[r["id"]] for r in rows if r.get("answer_type") == t] for t in ("CLOSED", "OPEN")}
    summary = {
        "judge_model": judge.model,
        "url": args.judge,
        "requests_sent": judge.sent,
        "unparsed": sum(not v.parsed for v in verdicts.values()),
        "open": mean_ci([float(h) for h in by_type["OPEN"]], args.seed, args.bootstrap),
        "closed": mean_ci([float(h) for h in by_type["CLOSED"]], args.seed, args.bootstrap),
    }
    return hits, summary


def score_set(
    model_label: str,
    model: str,
    model_dir: Path,
    set_name: str,
    test_file: Path,
    train_files,
    args: argparse.Namespace,
    protocols,
    hashes: HashCache,
) -> dict:
    out = Path(args.output)
    dataset = dataset_of(set_name)
    questions = generate.load_questions(test_file, None, {}, args.limit)
    expected = {q.id for q in questions}
    report: dict = {
        "file": str(test_file),
        "dataset": dataset,
        "questions": len(questions),
        "n_by_answer_type": dict(Counter(q.answer_type for q in questions)),
        "runs": {},
    }
    set_dir = out / "sets" / set_name
    model_set_dir = out / "models" / model_label / set_name

    # Leakage, before anything is scored.
    leak_files = train_files or sorted(p for p in test_file.parent.glob("*train*.jsonl"))
    leakage = (
        check_leakage(test_file, expected, leak_files, hashes, args.phash_distance) if leak_files else None
    )
    if leakage is not None:
        leakage["train_files_from"] = (
            "the model's training files"
            if train_files
            else "the set's own train split(s) beside the test file"
        )
    report["leakage"] = leakage
    excluded: set[str] = set()
    if args.exclude_leaked and leakage:
        for kind in args.exclude_leaked:
            excluded |= set(leakage["ids"][kind])
    report["excluded"] = {"kinds": args.exclude_leaked or [], "questions": len(excluded)}

    # Answer (resumable, shardable) unless only scoring; answers to another version of the set are refused first.
    data_for = {"real": test_file, "shuffled": test_file}
    if not args.score_only or (set_dir / f"noise-seed{args.seed}" / "test_noise.jsonl").is_file():
        data_for["noise"] = write_noise_set(test_file, set_dir / f"noise-seed{args.seed}", args.seed)
    for run in ("real", "shuffled", "noise"):
        done = [r for r in read_run(model_set_dir / run) if r["id"] in expected]
        check_current(done, questions, model_set_dir / run, test_file)
    for run in ("real", "shuffled", "noise"):
        run_dir = model_set_dir / run
        if args.score_only or run not in data_for:
            continue
        start = time.perf_counter()
        try:
            summary = answer(model, model_dir, data_for[run], run_dir, run, args)
        except SchemaError as e:
            report["runs"][run] = {"error": str(e)}
            print(f"[eval.scoreboard] {model_label}/{set_name}/{run}: {e}", file=sys.stderr)
            continue
        print(
            f"[eval.scoreboard] {model_label}/{set_name}/{run}: {json.dumps(summary)} "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )

    # Read every run; the prior is computed, not generated.
    run_rows: dict[str, list[dict]] = {}
    for run in ("real", "shuffled", "noise"):
        rows = [r for r in read_run(model_set_dir / run) if r["id"] in expected]
        if rows:
            run_rows[run] = rows
        report["runs"].setdefault(run, {})
        report["runs"][run].update({"answered": len(rows), "complete": len(rows) == len(expected)})
    train_split = train_split_of(test_file)
    if train_split is not None:
        rows, prior_info = prior_predictions(questions, train_split)
        write_jsonl(set_dir / "prior_predictions.jsonl", rows)
        run_rows["prior"] = rows
        report["runs"]["prior"] = {"answered": len(rows), "complete": True, **prior_info}
    incomplete = [r for r in ("real", "shuffled", "noise") if not report["runs"][r].get("complete")]
    if incomplete:
        print(
            f"[eval.scoreboard] {model_label}/{set_name}: runs not complete yet: {', '.join(incomplete)} "
            "(other shards still running? rerun with --score-only when they are done)",
            file=sys.stderr,
        )

    # Join the test rows' extra fields (e.g. multiple-choice `choices`) and score.
    extras = {row["id"]: {k: row[k] for k in ("choices",) if k in row} for _, row in read_jsonl(test_file)}
    pooled_runs: dict[str, dict] = {}
    for run, rows in run_rows.items():
        rows = [{**extras.get(r["id"], {}), **r} for r in rows if r["id"] not in excluded]
        if run == "real" and args.judge:
            hits, report["judge"] = judge_run(rows, args, out)
            rows = [{**r, "judge_hit": hits.get(r["id"])} for r in rows]
        report["runs"][run]["scored"] = len(rows)
        report["runs"][run]["protocols"], pooled_runs[run] = score_run(
            rows, dataset, protocols, args.seed, args.bootstrap
        )
    report["reads_image"] = {}
    if "real" in pooled_runs:
        for protocol in protocols:
            report["reads_image"][protocol.name] = {
                control: paired_gap(
                    pooled_runs["real"][protocol.name],
                    pooled_runs[control][protocol.name],
                    args.seed,
                    args.bootstrap,
                )
                if control in pooled_runs
                else None
                for control in (*CONTROLS, "prior")
            }
    return report


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def gap_cell(e: dict | None) -> str:
    if not e:
        return "-"
    low, high = e["ci95"]
    return f"{100 * e['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _protocol_cell(run: dict | None, protocol: str, split: str, default_n: int | None) -> str:
    e = (run or {}).get("protocols", {}).get(protocol, {}).get(split)
    cell = percent_cell(e)
    if e and default_n is not None and e["n"] != default_n:
        cell += f" n={e['n']}"
    return cell


def model_markdown(label: str, model: dict, protocols) -> list[str]:
    names = [p.name for p in protocols]
    lines = [
        f"## {label}",
        "",
        f"Model: `{model['model_dir']}`. Leakage checked against: {model['train_files_from']}.",
        "",
    ]
    lines += [
        "### Scores (%, bootstrap 95% CI; closed/open as each harness splits them)",
        "",
        "| set | split | n | " + " | ".join(PROTOCOLS[n].title for n in names) + " | judge |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for set_name, s in model["sets"].items():
        real = s["runs"].get("real")
        counts = s["n_by_answer_type"]
        scored = (real or {}).get("scored", 0)
        for split in SPLITS:
            default_n = {"closed": counts.get("CLOSED"), "open": counts.get("OPEN")}.get(split, scored)
            if split != "overall" and s.get("excluded", {}).get("questions"):
                default_n = None
            cells = [_protocol_cell(real, n, split, default_n) for n in names]
            judge = s.get("judge", {}).get(split) if split in ("closed", "open") else None
            lines.append(
                f"| {set_name} | {split} | {default_n if default_n is not None else '-'} | "
                + " | ".join(cells)
                + f" | {percent_cell(judge)} |"
            )
    lines += [
        "",
        "### Controls: does it read the image? (pooled per-question score: the harness's overall where it has "
        "one, else closed and open together)",
        "",
        "| set | protocol | real | images shuffled | noise image | question-only prior | reads the image: real - "
        "shuffled | real - noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, s in model["sets"].items():
        for n in names:
            if PROTOCOLS[n].needs_judge and not s.get("judge"):
                continue
            cells = [_protocol_cell(s["runs"].get(run), n, "pooled", None) for run in RUNS]
            gaps = s.get("reads_image", {}).get(n, {})
            lines.append(
                f"| {set_name} | {PROTOCOLS[n].title} | "
                + " | ".join(cells)
                + f" | {gap_cell(gaps.get('shuffled'))} | {gap_cell(gaps.get('noise'))} |"
            )
    lines += [
        "",
        "### Leakage (test questions whose image or question-answer pair is in the training files)",
        "",
        "| set | questions | test images | duplicate images (identical hash) | questions on them | QA pairs in "
        "train | same QA on a duplicate image | excluded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, s in model["sets"].items():
        leak = s.get("leakage")
        if not leak:
            lines.append(
                f"| {set_name} | {s['questions']} | - | no training files to check | - | - | - | 0 |"
            )
            continue
        q = leak["questions"]
        lines.append(
            f"| {set_name} | {s['questions']} | {leak['test_images']} | {leak['duplicate_images']} "
            f"({leak['identical_hash_images']}) | {q['images']} | {q['qa_pairs']} | {q['image_and_qa']} | "
            f"{s['excluded']['questions']} |"
        )
    notes = []
    for set_name, s in model["sets"].items():
        for run, r in s["runs"].items():
            if r.get("error"):
                notes.append(f"{set_name}/{run}: {r['error']}")
            elif run != "prior" and not r.get("complete"):
                notes.append(f"{set_name}/{run}: {r.get('answered', 0)} of {s['questions']} answered so far")
            for p, summary in r.get("protocols", {}).items():
                for note, count in summary.get("notes", {}).items():
                    if not PROTOCOLS[p].needs_judge:
                        notes.append(f"{set_name}/{run}/{p}: {count} x {note}")
        if "prior" not in s["runs"]:
            notes.append(f"{set_name}: no train split beside the test file, so no question-only prior")
        if s.get("judge"):
            j = s["judge"]
            notes.append(
                f"{set_name}: judge {j['judge_model']} at {j['url']} ({j['unparsed']} unparsed verdicts)"
            )
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return lines


def markdown(report: dict, protocols) -> str:
    lines = ["# Scoreboard: the same answers under every harness's rules", ""]
    for label, model in report["models"].items():
        lines += model_markdown(label, model, protocols) + [""]
    labels = list(report["models"])
    if len(labels) > 1:
        lines += [
            "## Models side by side (pooled score of the real run; reads the image = real - shuffled)",
            "",
            "| set | protocol | " + " | ".join(f"{m} | {m} reads the image" for m in labels) + " |",
            "|---|---|" + "---|---|" * len(labels),
        ]
        sets = list(dict.fromkeys(s for m in labels for s in report["models"][m]["sets"]))
        for set_name in sets:
            for p in protocols:
                cells = []
                for m in labels:
                    s = report["models"][m]["sets"].get(set_name, {})
                    cells.append(_protocol_cell(s.get("runs", {}).get("real"), p.name, "pooled", None))
                    cells.append(gap_cell(s.get("reads_image", {}).get(p.name, {}).get("shuffled")))
                lines.append(f"| {set_name} | {p.title} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Protocols (docs/eval.md has each one's rules and the file it mirrors): "
        + "; ".join(
            f"{p.title}: closed = {p.closed_metric}, open = {p.open_metric}, overall = "
            f"{p.overall_metric or 'none reported'}"
            for p in protocols
        )
        + "."
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, protocols, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    sets = list(dict.fromkeys(s for m in labels for s in report["models"][m]["sets"]))
    # Protocols without any number (the judge's, when there is no --judge) get no empty slot.
    names = [
        p.name
        for p in protocols
        if any(
            run.get("protocols", {}).get(p.name, {}).get("pooled")
            for m in labels
            for s in report["models"][m]["sets"].values()
            for run in s["runs"].values()
        )
    ] or [p.name for p in protocols]
    fig, axes = plt.subplots(
        len(labels), len(sets), figsize=(max(6.0, 4.5 * len(sets)), 3.6 * len(labels)), squeeze=False
    )
    width = 0.8 / len(RUNS)
    x = np.arange(len(names))
    for i, m in enumerate(labels):
        for j, set_name in enumerate(sets):
            ax = axes[i][j]
            runs = report["models"][m]["sets"].get(set_name, {}).get("runs", {})
            for k, run in enumerate(RUNS):
                entries = [runs.get(run, {}).get("protocols", {}).get(n, {}).get("pooled") for n in names]
                means = np.array([100 * e["mean"] if e else 0.0 for e in entries])
                low = np.array([100 * (e["mean"] - e["ci95"][0]) if e else 0.0 for e in entries])
                high = np.array([100 * (e["ci95"][1] - e["mean"]) if e else 0.0 for e in entries])
                ax.bar(
                    x + (k - (len(RUNS) - 1) / 2) * width,
                    means,
                    width,
                    yerr=[low, high],
                    capsize=2,
                    label=RUN_LABELS[run],
                )
            ax.set_xticks(x, [PROTOCOLS[n].title for n in names], rotation=30, ha="right", fontsize=7)
            ax.set_ylim(0, 100)
            ax.set_title(f"{m}: {set_name}", fontsize=9)
            ax.set_ylabel("% (95% CI)")
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=len(RUNS), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def model_label(model: str, model_dir: Path) -> str:
    return "default" if model == "default" else re.sub(r"[^A-Za-z0-9_.-]+", "_", model_dir.name) or "model"


def run(args: argparse.Namespace) -> dict:
    protocols = get_protocols(args.protocols)
    sets = discover_sets(args.set or [], args.sets)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    hashes = HashCache(out / "cache" / "phash.json")
    report: dict = {
        "seed": args.seed,
        "bootstrap_samples": args.bootstrap,
        "limit": args.limit,
        "protocols": {
            p.name: {
                "title": p.title,
                "mirrors": list(p.mirrors),
                "closed": p.closed_metric,
                "open": p.open_metric,
                "overall": p.overall_metric,
            }
            for p in protocols
        },
        "sets": {n: str(f) for n, f in sets.items()},
        "models": {},
    }
    labels = args.name or []
    if labels and len(labels) != len(args.model):
        raise ValueError(f"--name given {len(labels)} time(s) for {len(args.model)} --model(s)")
    for i, model in enumerate(args.model):
        model_dir = Path(generate.resolve_model(model))
        label = labels[i] if labels else model_label(model, model_dir)
        if label in report["models"]:
            label = f"{label}-{i}"
        train_files, source = model_train_files(model_dir, args.train_data)
        report["models"][label] = {
            "model": model,
            "model_dir": str(model_dir),
            "train_files": [str(f) for f in train_files],
            "train_files_from": source
            if train_files
            else "no train_report.json in the model directory and no --train-data, so each set's own *train*.jsonl "
            "files beside its test file",
            "sets": {},
        }
        for set_name, test_file in sets.items():
            report["models"][label]["sets"][set_name] = score_set(
                label, model, model_dir, set_name, test_file, train_files, args, protocols, hashes
            )
    write_json(out / "scoreboard.json", report)
    (out / "scoreboard.md").write_text(markdown(report, protocols), encoding="utf-8")
    plot(report, protocols, out / "scoreboard.png")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.scoreboard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", action="append", required=True, help="'default' or a Llava directory; repeatable"
    )
    p.add_argument("--name", action="append", help="a label per --model (default: 'default' or the dir name)")
    p.add_argument("--output", default="outputs/scoreboard", help="directory for every run and the reports")
    p.add_argument("--set", action="append", metavar="NAME=FILE", help="another test set (schema JSONL)")
    p.add_argument(
        "--sets", type=lambda s: [x for x in s.split(",") if x], help="only these sets (comma-joined)"
    )
    p.add_argument("--protocols", default="all", help=f"comma-joined subset of {','.join(PROTOCOLS)}")
    p.add_argument("--limit", type=int, help="only the first N questions of each set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--score-only", action="store_true", help="score what is answered; generate nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the controls and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument(
        "--train-data", nargs="+", help="training files for the leakage check (default: train_report)"
    )
    p.add_argument(
        "--exclude-leaked",
        nargs="?",
        const=",".join(LEAK_KINDS),
        metavar="KINDS",
        help=f"score without leaked questions; KINDS: comma-joined of {', '.join(LEAK_KINDS)}",
    )
    p.add_argument(
        "--phash-distance", type=int, default=4, help="max Hamming distance of near-duplicate images"
    )
    p.add_argument("--judge", metavar="URL", help="OpenAI-compatible base URL of an LLM judge (optional)")
    p.add_argument("--judge-model", help="judge model name (default: the endpoint's first model)")
    p.add_argument("--judge-api-key", default="not-needed")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index must be in [0, {args.num_shards}) and --num-shards >= 1")
    if args.bootstrap < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--bootstrap, --batch-size and --max-new-tokens must be >= 1")
    if not 0 <= args.phash_distance <= 64:
        p.error("--phash-distance must be in [0, 64]")
    if args.exclude_leaked is not None:
        kinds = [k for k in args.exclude_leaked.split(",") if k]
        bad = [k for k in kinds if k not in LEAK_KINDS]
        if bad or not kinds:
            p.error(f"--exclude-leaked: unknown kind(s) {bad or kinds}; choose from {', '.join(LEAK_KINDS)}")
        args.exclude_leaked = kinds
    try:
        get_protocols(args.protocols)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    from eval.judge import JudgeError

    args = parse_args(argv)
    start = time.perf_counter()
    try:
        run(args)
    except (SchemaError, FileNotFoundError, ValueError, JudgeError, generate.PredictionsFileError) as e:
        sys.exit(f"eval.scoreboard: error: {e}")
    print((Path(args.output) / "scoreboard.md").read_text(encoding="utf-8"), end="")
    print(
        f"wrote {args.output}/scoreboard.md, scoreboard.json, scoreboard.png "
        f"({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
