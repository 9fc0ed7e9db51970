"""eval.scoreboard on a tiny model and a hand-made set (controls, prior, leakage, resume, shards) and eval.judge
against a fake OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, random_image
from PIL import Image

from eval import scoreboard

QUESTIONS = [  # (image index, question, answer, answer_type)
    (0, "Is there a lesion?", "yes", "CLOSED"),
    (0, "Which organ is shown?", "liver", "OPEN"),
    (1, "Is there a lesion?", "no", "CLOSED"),
    (1, "Which organ is shown?", "lung", "OPEN"),
    (2, "Is this a CT image?", "yes", "CLOSED"),
    (2, "Which organ is shown?", "kidney", "OPEN"),
    (3, "Is this a CT image?", "no", "CLOSED"),
]


def vqa_row(row_id: str, image: str, question: str, answer: str, answer_type: str) -> dict:
    return {
        "id": row_id,
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "answer_type": answer_type,
        "source": "tiny",
    }


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """test.jsonl (7 questions on 4 images of different sizes, one grayscale) and train.jsonl beside it: one train image is a
    byte copy of test image 0 (same QA pair too), another is new; "Which organ is shown?" -> liver twice."""
    root = tmp_path_factory.mktemp("tiny-set")
    (root / "images").mkdir()
    for i, size in enumerate([(40, 30), (36, 36), (50, 28)]):
        random_image(seed=10 + i, size=size).save(root / "images" / f"test-{i}.png")
    gray = np.random.default_rng(3).integers(0, 256, (44, 30), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "images" / "test-3.png")
    shutil.copy(root / "images" / "test-0.png", root / "images" / "train-0.png")
    random_image(seed=99, size=(40, 40)).save(root / "images" / "train-1.png")
    test = [vqa_row(f"t{i}", f"images/test-{img}.png", q, a, t) for i, (img, q, a, t) in enumerate(QUESTIONS)]
    train = [
        vqa_row("r0", "images/train-0.png", "Is there a lesion?", "yes", "CLOSED"),
        vqa_row("r1", "images/train-1.png", "Which organ is shown?", "liver", "OPEN"),
        vqa_row("r2", "images/train-1.png", "Which organ is shown?", "liver", "OPEN"),
        vqa_row("r3", "images/train-1.png", "Which organ is shown?", "lung", "OPEN"),
        vqa_row("r4", "images/train-1.png", "Is this a CT image?", "no", "CLOSED"),
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    return root


@pytest.fixture(scope="module")
def board(tiny_set, tiny_model_dir, tmp_path_factory):
    """One full scoreboard run of the tiny model on the tiny set (args, output dir, report)."""
    out = tmp_path_factory.mktemp("board")
    argv = [
        "--model",
        str(tiny_model_dir),
        "--name",
        "tiny",
        "--set",
        f"tiny={tiny_set / 'test.jsonl'}",
        "--sets",
        "tiny",
        "--output",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "8",
        "--bootstrap",
        "50",
        "--phash-distance",
        "0",
    ]
    scoreboard.main(argv)
    return argv, out, json.loads((out / "scoreboard.json").read_text())


def test_scoreboard_runs_every_control_and_protocol(board, tiny_set, capsys):
    _, out, report = board
    s = report["models"]["tiny"]["sets"]["tiny"]
    assert s["questions"] == 7 and s["n_by_answer_type"] == {"CLOSED": 4, "OPEN": 3}
    for run in ("real", "shuffled", "noise", "prior"):
        assert s["runs"][run]["complete"] and s["runs"][run]["scored"] == 7, run
        assert set(s["runs"][run]["protocols"]) == set(scoreboard.PROTOCOLS)
    ours = s["runs"]["real"]["protocols"]["ours"]
    assert ours["closed"]["n"] == 4 and ours["open"]["n"] == 3 and ours["overall"]["n"] == 7
    assert s["runs"]["real"]["protocols"]["llava_med"]["overall"] is None
    assert s["runs"]["real"]["protocols"]["vlmevalkit"]["pooled"] is None  # no --judge
    gap = s["reads_image"]["ours"]["shuffled"]
    assert gap["n"] == 7 and gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
    # The gap is real minus control, question by question.
    real = [json.loads(x) for x in (out / "models/tiny/tiny/real/predictions.jsonl").read_text().splitlines()]
    noise = [
        json.loads(x) for x in (out / "models/tiny/tiny/noise/predictions.jsonl").read_text().splitlines()
    ]
    assert {r["id"] for r in real} == {r["id"] for r in noise}
    assert "[noise images, seed 0]" in noise[0]["model"]
    md = (out / "scoreboard.md").read_text()
    assert "reads the image: real - shuffled" in md and "question-only prior" in md
    assert (out / "scoreboard.png").stat().st_size > 0


def test_noise_images_are_seeded_and_keep_sizes(board, tiny_set):
    _, out, _ = board
    noise_rows = [
        json.loads(x) for x in (out / "sets/tiny/noise-seed0/test_noise.jsonl").read_text().splitlines()
    ]
    test_rows = [json.loads(x) for x in (tiny_set / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in noise_rows] == [r["id"] for r in test_rows]
    for noisy, original in zip(noise_rows, test_rows, strict=True):
        with (
            Image.open(tiny_set / original["images"][0]) as a,
            Image.open(out / "sets/tiny/noise-seed0" / noisy["images"][0]) as b,
        ):
            assert a.size == b.size
    # Questions that shared a picture share its noise; a rerun draws the same pixels.
    assert noise_rows[0]["images"] == noise_rows[1]["images"] != noise_rows[2]["images"]
    again = scoreboard.noise_image((40, 30), 3, 0, 0)
    first = Image.open(out / "sets/tiny/noise-seed0/images/noise-00000.png")
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(again), np.asarray(scoreboard.noise_image((40, 30), 3, 1, 0)))
    with Image.open(out / "sets/tiny/noise-seed0" / noise_rows[6]["images"][0]) as gray:
        assert gray.mode == "L" and gray.size == (30, 44)


def test_question_only_prior(board, tiny_set):
    _, out, report = board
    prior = {
        json.loads(x)["id"]: json.loads(x)["prediction"]
        for x in (out / "sets/tiny/prior_predictions.jsonl").read_text().splitlines()
    }
    # "Which organ is shown?" -> liver (2 of 3 in train); "Is this a CT image?" -> no; "Is there a lesion?" -> yes.
    assert prior == {
        "t0": "yes",
        "t1": "liver",
        "t2": "yes",
        "t3": "liver",
        "t4": "no",
        "t5": "liver",
        "t6": "no",
    }
    ours = report["models"]["tiny"]["sets"]["tiny"]["runs"]["prior"]["protocols"]["ours"]
    assert ours["overall"]["mean"] == pytest.approx(3 / 7)  # t0, t1, t6 right


def test_leakage_counts_and_exclusion(board, tiny_set):
    argv, out, report = board
    leak = report["models"]["tiny"]["sets"]["tiny"]["leakage"]
    # No --train-data and no train_report.json: the set's own train split is checked.
    assert leak["train_files"] == [str(tiny_set / "train.jsonl")]
    assert leak["duplicate_images"] == 1 and leak["identical_hash_images"] == 1
    # QA pairs in train: t0 (lesion, yes), t1 (organ, liver), t3 (organ, lung), t6 (CT, no).
    assert leak["questions"] == {"images": 2, "qa_pairs": 4, "image_and_qa": 1}
    assert leak["ids"]["image_and_qa"] == ["t0"]
    lines_before = (out / "models/tiny/tiny/real/predictions.jsonl").read_text()
    scoreboard.main([*argv, "--exclude-leaked", "images"])
    again = json.loads((out / "scoreboard.json").read_text())["models"]["tiny"]["sets"]["tiny"]
    assert again["excluded"] == {"kinds": ["images"], "questions": 2}
    assert again["runs"]["real"]["scored"] == 5 and again["runs"]["prior"]["scored"] == 5
    # Resumed: nothing was answered again.
    assert (out / "models/tiny/tiny/real/predictions.jsonl").read_text() == lines_before


def test_train_data_from_train_report(tmp_path, tiny_set):
    model = tmp_path / "model"
    model.mkdir()
    (model / "train_report.json").write_text(
        json.dumps({"train": {"file": str(tiny_set / "train.jsonl")}, "eval": {"file": "missing.jsonl"}})
    )
    files, source = scoreboard.model_train_files(model, None)
    assert files == [tiny_set / "train.jsonl"] and source.endswith("train_report.json")
    assert scoreboard.model_train_files(tmp_path, None) == ([], "none")
    with pytest.raises(FileNotFoundError, match="--train-data"):
        scoreboard.model_train_files(model, [str(tmp_path / "nope.jsonl")])


def test_shards_are_scored_when_complete(tiny_set, tiny_model_dir, tmp_path):
    base = [
        "--model",
        str(tiny_model_dir),
        "--name",
        "tiny",
        "--set",
        f"tiny={tiny_set / 'test.jsonl'}",
        "--sets",
        "tiny",
        "--output",
        str(tmp_path),
        "--max-new-tokens",
        "2",
        "--bootstrap",
        "20",
        "--protocols",
        "ours,medevalkit",
        "--limit",
        "5",
    ]
    scoreboard.main([*base, "--num-shards", "2", "--shard-index", "0"])
    first = json.loads((tmp_path / "scoreboard.json").read_text())["models"]["tiny"]["sets"]["tiny"]
    assert first["runs"]["real"] == {**first["runs"]["real"], "answered": 3, "complete": False}
    scoreboard.main([*base, "--num-shards", "2", "--shard-index", "1"])
    second = json.loads((tmp_path / "scoreboard.json").read_text())["models"]["tiny"]["sets"]["tiny"]
    assert second["runs"]["real"]["complete"] and second["runs"]["real"]["scored"] == 5
    assert sorted(p.name for p in (tmp_path / "models/tiny/tiny/real").iterdir()) == [
        "predictions.shard0-of-2.jsonl",
        "predictions.shard1-of-2.jsonl",
    ]


def test_a_rebuilt_test_set_is_not_mixed_with_old_answers(tiny_set, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "set"
    shutil.copytree(tiny_set, data)
    argv = [
        "--model",
        str(tiny_model_dir),
        "--set",
        f"tiny={data / 'test.jsonl'}",
        "--sets",
        "tiny",
        "--output",
        str(tmp_path / "out"),
        "--max-new-tokens",
        "2",
        "--bootstrap",
        "10",
        "--protocols",
        "ours",
        "--limit",
        "3",
    ]
    scoreboard.main(argv)
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    rows[0]["messages"][1]["content"][0]["text"] = "no"
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    random_image(seed=5, size=(20, 24)).save(data / "images" / "test-0.png")
    with pytest.raises(SystemExit, match="another version of"):
        scoreboard.main([*argv, "--score-only"])
    # The noise picture follows its source's new size.
    with Image.open(tmp_path / "out/sets/tiny/noise-seed0/images/noise-00000.png") as noise:
        assert noise.size == (20, 24)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        scoreboard.parse_args(["--model", "m", "--exclude-leaked", "pixels"])
    with pytest.raises(SystemExit):
        scoreboard.parse_args(["--model", "m", "--protocols", "ours,nope"])
    with pytest.raises(ValueError, match="NAME=FILE"):
        scoreboard.discover_sets(["justafile.jsonl"], None, tmp_path)
    with pytest.raises(FileNotFoundError, match="make data"):
        scoreboard.discover_sets([], None, tmp_path)
    with pytest.raises(FileNotFoundError, match="--sets"):
        scoreboard.discover_sets([], ["vqa_rad"], tmp_path)


def test_paired_gap():
    real = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}
    control = {"a": 0.0, "b": 1.0, "c": 0.0, "e": 1.0}
    gap = scoreboard.paired_gap(real, control, seed=0, n_boot=200)
    assert gap["n"] == 3 and gap["mean"] == pytest.approx(1 / 3)
    assert gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
    assert scoreboard.paired_gap({"a": 1.0}, {"b": 1.0}, 0, 10) is None


# ---------------------------------------------------------------------------------------------------------------
# The judge against a fake OpenAI-compatible server (FastAPI + uvicorn on 127.0.0.1)
# ---------------------------------------------------------------------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    match = re.search(re.escape(start) + r"(.*?)" + re.escape(end), text, re.DOTALL)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def fake_judge():
    """A judge that says "yes" when the reference occurs in the model answer, never decides on "garbage"."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    calls: list[dict] = []

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": "fake-judge", "object": "model", "created": 0, "owned_by": "t"}],
        }

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        calls.append(body)
        prompt = body["messages"][-1]["content"]
        reference = _between(prompt, "[Begin Reference]", "[End Reference]").strip().lower()
        answer = _between(prompt, "[Begin Model Answer]", "[End Model Answer]").strip().lower()
        if answer == "garbage":
            reply = "I cannot tell."
        else:
            verdict = "yes" if reference and reference in answer else "no"
            reply = f"[Begin Correctness]{verdict}[End Correctness]\n[Begin Reason]compared[End Reason]"
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "fake judge did not start"
    yield f"http://127.0.0.1:{port}/v1", calls
    server.should_exit = True
    thread.join(timeout=10)


def test_judge_caches_and_resumes(fake_judge, tmp_path):
    from eval.judge import Judge, request_body, request_hash

    url, calls = fake_judge
    rows = [
        {"id": "a", "question": "Which organ?", "answer": "liver", "prediction": "The liver."},
        {"id": "b", "question": "Which organ?", "answer": "liver", "prediction": "The spleen."},
        {"id": "c", "question": "Which organ?", "answer": "lung", "prediction": "garbage"},
    ]
    start = len(calls)
    judge = Judge(url, tmp_path / "cache")
    assert judge.model == "fake-judge"
    verdicts = judge.judge_rows(rows)
    assert {k: v.hit for k, v in verdicts.items()} == {"a": 1, "b": 0, "c": 0}
    assert (
        verdicts["c"].attempts == 3 and not verdicts["c"].parsed
    )  # three temperatures, then "fail to judge"
    assert [c["temperature"] for c in calls[start:]] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert judge.sent == 5 and len(list((tmp_path / "cache").glob("*.json"))) == 5
    # A second judge on the same cache asks nothing; a lost cache entry is asked again, alone.
    again = Judge(url, tmp_path / "cache")
    assert {k: v.hit for k, v in again.judge_rows(rows).items()} == {"a": 1, "b": 0, "c": 0}
    assert again.sent == 0
    (
        tmp_path
        / "cache"
        / f"{request_hash(request_body('fake-judge', 'Which organ?', 'liver', 'The liver.', 0.0))}"
        ".json"
    ).unlink()
    third = Judge(url, tmp_path / "cache")
    third.judge_rows(rows)
    assert third.sent == 1


def test_judge_unreachable(tmp_path):
    from eval.judge import Judge, JudgeError

    port = free_port()
    with pytest.raises(JudgeError, match="cannot list models"):
        Judge(f"http://127.0.0.1:{port}/v1", tmp_path, timeout=2)


def test_scoreboard_with_judge(board, fake_judge):
    argv, out, _ = board
    scoreboard.main([*argv, "--judge", fake_judge[0]])
    s = json.loads((out / "scoreboard.json").read_text())["models"]["tiny"]["sets"]["tiny"]
    assert s["judge"]["judge_model"] == "fake-judge" and s["judge"]["open"]["n"] == 3
    vlm = s["runs"]["real"]["protocols"]["vlmevalkit"]
    assert vlm["overall"]["n"] == 7  # VLMEvalKit judges every question
    # The string metrics are still there beside the judge.
    assert s["runs"]["real"]["protocols"]["medevalkit"]["overall"]["n"] == 7
    assert Path(out / "judge_cache").is_dir()
