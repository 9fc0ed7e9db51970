"""eval.generate (resume after a kill, batched == sequential, sharding) and eval.score (files, formulas, reports)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_image, tiny_model
from test_metrics import ref_closed, ref_prf

from eval import generate as gen
from eval import score as sc
from medllava.prompts import ANSWER_SUFFIXES
from medllava.schema import SchemaError, make_vqa_row, vqa_answer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("Is there a mass?", "yes", "CLOSED"),
    ("Which organ is shown?", "liver", "OPEN"),
    ("Is this normal?", "no", "CLOSED"),
    ("What modality is this image?", "ct", "OPEN"),
    ("Which option fits? A. lung B. heart", "B", "CHOICE"),
    ("Where is the lesion located in this image and how large is it?", "left upper lobe", None),
]
VOLATILE = ("latency_s",)  # wall-clock fields, the only ones allowed to differ between runs


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory):
    """A tiny random model whose greedy answers differ between questions.

    The shared `tiny_model_dir` ties its head to the embeddings and repeats the newline it is prompted with, so
    every prediction would be empty and comparisons vacuous; an untied random head makes answers vary.
    """
    model, processor = tiny_model(seed=0)
    torch.manual_seed(1)
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
    path = tmp_path_factory.mktemp("varied-tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_vqa(directory: Path, n: int) -> Path:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with (directory / "vqa.jsonl").open("w") as f:
        for i in range(n):
            random_image(i, size=(40 + i, 36)).save(directory / "images" / f"im{i}.png")
            question, answer, answer_type = QUESTIONS[i % len(QUESTIONS)]
            row = make_vqa_row(
                f"q{i:03d}",
                [f"images/im{i}.png"],
                question,
                answer,
                answer_type,
                question_type=["PRES", "ORGAN", "POS"][i % 3],
                modality=["CT", "MRI"][i % 2],
            )
            f.write(json.dumps(row) + "\n")
    return directory / "vqa.jsonl"


@pytest.fixture(scope="module")
def vqa_file(tmp_path_factory):
    return write_vqa(tmp_path_factory.mktemp("vqa"), 16)


def run_generate(model_dir, data, output, *extra):
    args = gen.parse_args(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(output),
            "--max-new-tokens",
            "6",
            *map(str, extra),
        ]
    )
    return gen.run(args)


def read_lines(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in path.read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def reference_run(varied_model_dir, vqa_file, tmp_path_factory):
    """An uninterrupted run, one question at a time."""
    out = tmp_path_factory.mktemp("ref") / "predictions.jsonl"
    run_generate(varied_model_dir, vqa_file, out, "--batch-size", 1)
    return read_lines(out)


def test_reference_run_has_every_question_with_fields(reference_run):
    assert sorted(r["id"] for r in reference_run) == [f"q{i:03d}" for i in range(16)]
    assert (
        len({r["prediction"] for r in reference_run}) > 3
    )  # answers vary, so comparisons below mean something
    by_id = {r["id"]: r for r in reference_run}
    first = by_id["q000"]
    assert (
        first["question"] == "Is there a mass?"
        and first["answer"] == "yes"
        and first["answer_type"] == "CLOSED"
    )
    assert first["question_type"] == "PRES" and first["modality"] == "CT" and first["model"]
    assert by_id["q005"]["answer_type"] == "OPEN"  # no answer_type in the row: inferred from the answer
    # answered grouped by answer type (a batch of yes/no questions stops early)
    types = [r["answer_type"] for r in reference_run]
    assert types == sorted(types)


def test_resume_after_kill_equals_uninterrupted_run(varied_model_dir, vqa_file, reference_run, tmp_path):
    out = tmp_path / "predictions.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "eval.generate",
        "--model",
        str(varied_model_dir),
        "--data",
        str(vqa_file),
        "--output",
        str(out),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 3 <= written < 16, f"the kill should land mid-run ({written} lines written)"
    with out.open("ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"id": "q0XX", "prediction": "torn')
    run_generate(varied_model_dir, vqa_file, out, "--batch-size", 1)
    resumed = read_lines(out)
    assert len(resumed) == len({r["id"] for r in resumed}) == 16  # no duplicates, nothing missing
    assert resumed == reference_run


def test_batched_equals_sequential(varied_model_dir, vqa_file, reference_run, tmp_path):
    out = tmp_path / "batched.jsonl"
    run_generate(varied_model_dir, vqa_file, out, "--batch-size", 5)
    batched = read_lines(out)
    assert [(r["id"], r["prediction"]) for r in batched] == [
        (r["id"], r["prediction"]) for r in reference_run
    ]
    assert [r["completion_tokens"] for r in batched] == [r["completion_tokens"] for r in reference_run]


def test_shards_cover_every_id_exactly_once(varied_model_dir, vqa_file, reference_run, tmp_path):
    seen = []
    for k in range(3):
        out = tmp_path / f"shard{k}.jsonl"
        run_generate(
            varied_model_dir,
            vqa_file,
            out,
            "--batch-size",
            4,
            "--num-shards",
            3,
            "--shard-index",
            k,
            "--limit",
            10,
        )
        ids = sorted(r["id"] for r in read_lines(out))
        assert ids == [f"q{i:03d}" for i in range(10) if i % 3 == k]
        seen += read_lines(out)
    assert sorted(r["id"] for r in seen) == [f"q{i:03d}" for i in range(10)]
    by_id = {r["id"]: r["prediction"] for r in reference_run}
    assert all(r["prediction"] == by_id[r["id"]] for r in seen)


def test_rerun_of_a_finished_file_answers_nothing(varied_model_dir, vqa_file, tmp_path):
    out = tmp_path / "p.jsonl"
    run_generate(varied_model_dir, vqa_file, out, "--limit", 3, "--batch-size", 3)
    before = out.read_text()
    summary = run_generate(varied_model_dir, vqa_file, out, "--limit", 3)
    assert summary["answered_now"] == 0 and out.read_text() == before


def test_read_done_cuts_torn_line_and_refuses_other_models(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"id": "a", "model": "m"}\n{"id": "b", "model": "m"}\n{"id": "c", "mo')
    assert gen.read_done(out, "m") == {"a", "b"}
    assert out.read_text() == '{"id": "a", "model": "m"}\n{"id": "b", "model": "m"}\n'
    with pytest.raises(gen.PredictionsFileError, match="p.jsonl:1: predictions of model 'm'"):
        gen.read_done(out, "other")
    out.write_text('{"id": "a", "model": "m"}\nnot json\n{"id": "b", "model": "m"}\n')
    with pytest.raises(gen.PredictionsFileError, match="p.jsonl:2: malformed"):
        gen.read_done(out, "m")


def test_suffixes_and_bad_rows(tmp_path):
    data = write_vqa(tmp_path, 6)
    questions = gen.load_questions(data, None, ANSWER_SUFFIXES)
    text = questions[0].messages[-1]["content"][-1]["text"]
    assert text == "Is there a mass? Answer yes or no."
    assert questions[1].messages[-1]["content"][-1]["text"].endswith("Answer with a short phrase.")
    assert questions[0].question == "Is there a mass?"  # the recorded question has no suffix
    assert questions[0].images[0] == tmp_path / "images" / "im0.png"  # relative to the data file
    bare = gen.load_questions(data, None, {})
    assert bare[0].messages[-1]["content"][-1]["text"] == "Is there a mass?"
    assert [q.id for q in gen.load_questions(data, None, {}, limit=2)] == ["q000", "q001"]
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(SchemaError, match=r"vqa.jsonl:7: duplicate id 'q001' \(first on line 2\)"):
        gen.load_questions(data, None, {})
    data.write_text(lines[0] + "\n" + json.dumps({"id": "x", "images": [], "messages": []}) + "\n")
    with pytest.raises(SchemaError, match="vqa.jsonl:2: messages"):
        gen.load_questions(data, None, {})


def test_stated_gold_answers_are_scored_on_their_verdict(tmp_path):
    data = write_vqa(tmp_path, 2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["messages"][-1]["content"][-1]["text"] = "There is a round lesion in the liver. Yes."
    del rows[0]["answer_type"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = gen.load_questions(data, None, {})
    assert (first.answer, first.answer_type, first.answer_type_inferred) == ("Yes", "CLOSED", True)
    assert second.answer == vqa_answer(rows[1])  # a short answer stays as it is


def test_shuffled_images_never_keep_their_own_picture(tmp_path):
    data = write_vqa(tmp_path, 6)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["images"] = rows[0]["images"]  # two questions about one picture
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = gen.load_questions(data, None, {})
    shuffled = gen.shuffle_images(questions, seed=3)
    assert [q.id for q in shuffled] == [q.id for q in questions]
    assert all(s.images != q.images for s, q in zip(shuffled, questions, strict=True))
    assert {tuple(s.images) for s in shuffled} == {
        tuple(q.images) for q in questions
    }  # a permutation of pictures
    assert shuffled[0].images == shuffled[1].images  # questions that shared a picture still share one
    assert [s.images for s in gen.shuffle_images(questions, seed=3)] == [s.images for s in shuffled]
    with pytest.raises(SchemaError, match="at least two different images"):
        gen.shuffle_images(questions[:1], seed=0)


def test_unreadable_image_gives_a_counted_error_row(varied_model_dir, tmp_path):
    data = write_vqa(tmp_path, 3)
    (tmp_path / "images" / "im1.png").write_bytes(b"not an image")
    out = tmp_path / "p.jsonl"
    summary = run_generate(varied_model_dir, data, out, "--batch-size", 3)
    rows = {r["id"]: r for r in read_lines(out)}
    assert summary["image_errors"] == 1 and sorted(rows) == ["q000", "q001", "q002"]
    assert (
        "im1.png" in rows["q001"]["error"]
        and rows["q001"]["prediction"] == ""
        and "error" not in rows["q000"]
    )


def test_generate_cli_errors_are_clear(tmp_path, varied_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.generate",
            "--model",
            str(varied_model_dir),
            "--data",
            str(bad),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "bad.jsonl:1: malformed JSON" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# eval.score
# ---------------------------------------------------------------------------------------------------------------

PREDICTIONS = [  # (id, answer, prediction, answer_type, question_type, modality)
    ("1", "yes", "Yes.", "CLOSED", "PRES", "CT"),
    ("2", "no", "The lesion is abnormal", "CLOSED", "PRES", "MRI"),
    ("3", "no", "yes", "CLOSED", "ABN", "CT"),
    ("4", "yes", "no, yes", "CLOSED", "ABN", "CT"),
    ("5", "left lung", "The left lung.", "OPEN", "POS", "CT"),
    ("6", "liver", "the liver and the spleen", "OPEN", "ORGAN", "MRI"),
    ("7", "2", "There are two nodules", "OPEN", "COUNT", "CT"),
    ("8", "kidney cyst", "cyst", "OPEN", "ABN", "MRI"),
    ("9", "B", "(b)", "CHOICE", "ORGAN", "CT"),
    ("10", "C", "answer: a", "CHOICE", "ORGAN", "CT"),
]


def write_predictions(path: Path, rows=PREDICTIONS, transform=lambda p: p) -> Path:
    with path.open("w") as f:
        for rid, answer, pred, at, qt, mod in rows:
            f.write(
                json.dumps(
                    {
                        "id": rid,
                        "answer": answer,
                        "prediction": transform(pred),
                        "answer_type": at,
                        "question_type": qt,
                        "modality": mod,
                        "model": "m",
                    }
                )
                + "\n"
            )
    return path


def test_score_cli_writes_reports_equal_to_llava_med_formulas(tmp_path, capsys):
    a = write_predictions(tmp_path / "a.jsonl")
    b = write_predictions(tmp_path / "b.jsonl", transform=lambda p: "yes")
    out = tmp_path / "report"
    sc.main(["--predictions", str(a), str(b), "--output", str(out), "--names", "model-a", "model-b"])
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["runs"]) == ["model-a", "model-b"]
    run = report["runs"]["model-a"]
    closed = [(p[2], p[1]) for p in PREDICTIONS if p[3] == "CLOSED"]
    opened = [(p[2], p[1]) for p in PREDICTIONS if p[3] == "OPEN"]
    want_closed = sum(ref_closed(p, g) for p, g in closed) / len(closed)
    want_recall = sum(ref_prf(p, g)[1] for p, g in opened) / len(opened)
    want_f1 = sum(ref_prf(p, g)[2] for p, g in opened) / len(opened)
    assert run["by_answer_type"]["CLOSED"]["llava_closed_accuracy"]["mean"] == pytest.approx(
        want_closed, abs=1e-6
    )
    assert run["by_answer_type"]["OPEN"]["llava_recall"]["mean"] == pytest.approx(want_recall, abs=1e-6)
    assert run["by_answer_type"]["OPEN"]["llava_f1"]["mean"] == pytest.approx(want_f1, abs=1e-6)
    assert run["by_answer_type"]["CLOSED"]["strict_closed_accuracy"]["mean"] == pytest.approx(0.25)
    assert run["by_answer_type"]["CHOICE"]["strict_choice_accuracy"]["mean"] == pytest.approx(0.5)
    assert run["n_by_answer_type"] == {"CLOSED": 4, "OPEN": 4, "CHOICE": 2}
    closed_runs = run["by_answer_type"][
        "CLOSED"
    ]  # equal per-question values: paired resamples, equal intervals
    assert closed_runs["llava_closed_accuracy"] == closed_runs["llava_closed_accuracy_yn"]
    for entry in run["by_answer_type"]["OPEN"].values():
        low, high = entry["ci95"]
        assert low <= entry["mean"] + 1e-12 and entry["mean"] <= high + 1e-12
    assert run["by_modality"]["MRI"]["CLOSED"]["llava_closed_accuracy"]["n"] == 1
    assert set(run["by_question_type"]) == {"PRES", "ABN", "POS", "ORGAN", "COUNT"}
    assert report["runs"]["model-b"]["by_answer_type"]["CLOSED"]["strict_closed_accuracy"]["mean"] == 0.5
    table = (out / "metrics.md").read_text()
    assert table == printed
    assert "LLaVA-Med-compatible" in table and "strict" in table and "model-a" in table and "model-b" in table
    assert "| CLOSED (n=4/4) | LLaVA-Med yes/no accuracy (substring)" in table
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_is_deterministic_and_reads_shards_as_one_run(tmp_path):
    whole = write_predictions(tmp_path / "whole.jsonl")
    s0 = write_predictions(tmp_path / "s0.jsonl", PREDICTIONS[:4])
    s1 = write_predictions(tmp_path / "s1.jsonl", PREDICTIONS[4:])
    one = sc.score_files([str(whole)], tmp_path / "r1", names=["x"])
    two = sc.score_files([f"{s0},{s1}"], tmp_path / "r2", names=["x"])
    one["runs"]["x"].pop("files"), two["runs"]["x"].pop("files")
    assert one == two  # same questions, same seed: identical numbers and intervals


def test_score_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "answer": "yes"}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: prediction row without prediction"):
        sc.main(["--predictions", str(bad), "--output", str(tmp_path / "o")])
    dup = write_predictions(tmp_path / "dup.jsonl", PREDICTIONS[:2] + PREDICTIONS[:1])
    with pytest.raises(SystemExit, match=r"dup.jsonl:3: duplicate id '1'"):
        sc.main(["--predictions", str(dup), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--names has 1 name"):
        sc.main(["--predictions", str(dup), str(bad), "--names", "x", "--output", str(tmp_path / "o")])


def test_stage_table_rows_come_from_the_score_and_likelihood_files(tmp_path, capsys):
    from eval.diagnostics import stages

    modality = {
        "1",
        "3",
        "8",
    }  # strict: "Yes." for yes is right, "yes" for no and "cyst" for "kidney cyst" wrong
    rows = [(*p[:4], "MODALITY" if p[0] in modality else p[4], p[5]) for p in PREDICTIONS]
    sc.score_files([str(write_predictions(tmp_path / "p.jsonl", rows))], tmp_path / "s1", names=["s1"])
    (tmp_path / "s1" / "nll_captions.json").write_text(json.dumps({"nll": 2.34567}))
    stages.main([f"stage1={tmp_path / 's1'}"])
    header, rule, row = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip(stages.COLUMNS, [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert cells["model"] == "stage1" and cells["n"] == "10"
    assert cells["strict closed acc"].startswith("25.0 [")
    assert cells["modality acc (strict)"] == "33.3"
    assert cells["caption NLL"] == "2.346" and cells["conversation NLL"] == "-"
    with pytest.raises(SystemExit):
        stages.main([str(tmp_path / "s1")])  # no NAME=
