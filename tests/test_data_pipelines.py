"""Converters from official layouts (hand-made fixtures written here), the validator CLI, captions, preferences."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from conftest import random_image

from data_pipelines import (
    captions,
    described,
    group_turns,
    llava_med_eval,
    pathvqa,
    preferences,
    slake,
    validate,
    vqa_rad,
)
from medllava.schema import CHOICE, CLOSED, OPEN, make_vqa_row, read_rows, validate_row, vqa_answer


def save_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, size=(40, 40)).save(path)
    return path


def assert_valid(out_dir: Path, split: str) -> list[dict]:
    rows = read_rows(out_dir / f"{split}.jsonl")
    for row in rows:
        assert validate_row(row, out_dir) == [], row
    return rows


# ---------------------------------------------------------------------------------------------------------------
# VQA-RAD
# ---------------------------------------------------------------------------------------------------------------


def make_vqa_rad(root: Path) -> Path:
    folder = root / "VQA_RAD Image Folder"
    for i in range(3):
        save_image(folder / f"synpic{i}.jpg", i)
    records = [
        {
            "qid": 1,
            "image_name": "synpic0.jpg",
            "question": "Is there a mass?",
            "answer": "Yes",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "image_organ": "CHEST",
            "phrase_type": "freeform",
        },
        {
            "qid": 2,
            "image_name": "synpic0.jpg",
            "question": "How many lesions?",
            "answer": 2,
            "answer_type": "OPEN",
            "question_type": "COUNT",
            "image_organ": "CHEST",
            "phrase_type": "para",
        },
        {
            "qid": 3,
            "image_name": "synpic1.jpg",
            "question": "Where is the mass?",
            "answer": "left lung",
            "answer_type": "OPEN ",
            "question_type": "POS",
            "image_organ": "CHEST",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 4,
            "image_name": "synpic0.jpg",
            "question": "Is it normal?",
            "answer": "no",
            "answer_type": "CLOSED",
            "question_type": "ABN",
            "image_organ": "CHEST",
            "phrase_type": "test_para",
        },
        {
            "qid": 5,
            "image_name": "synpic2.jpg",
            "question": "Is the liver enlarged?",
            "answer": "no",
            "answer_type": "CLOSED",
            "question_type": "SIZE",
            "image_organ": "ABD",
            "phrase_type": "frame",
        },
        {
            "qid": 6,
            "image_name": "synpic9.jpg",
            "question": "Missing image?",
            "answer": "yes",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "image_organ": "HEAD",
            "phrase_type": "freeform",
        },
        {
            "qid": 7,
            "image_name": "synpic1.jpg",
            "question": "",
            "answer": "yes",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "image_organ": "HEAD",
            "phrase_type": "test_para",
        },
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    return root


def test_vqa_rad_official_split_types_and_leakage(tmp_path, capsys):
    src, out = make_vqa_rad(tmp_path / "src"), tmp_path / "out"
    assert vqa_rad.main(["--input", str(src), "--output", str(out)]) == 0
    train, test = assert_valid(out, "train"), assert_valid(out, "test")
    assert [r["id"] for r in train] == ["vqa_rad-1", "vqa_rad-2", "vqa_rad-5"]
    assert [r["id"] for r in test] == ["vqa_rad-3", "vqa_rad-4"]
    assert [r["answer_type"] for r in train] == [CLOSED, OPEN, CLOSED]
    assert [r["answer_type"] for r in test] == [OPEN, CLOSED]
    assert vqa_answer(train[0]) == "yes" and vqa_answer(train[1]) == "2"  # 'Yes' lower-cased; number as text
    assert train[0]["question_type"] == "PRES" and train[0]["organ"] == "CHEST"
    reasons = {r["row"]["qid"]: r["reasons"] for r in read_rows(out / "rejected.jsonl")}
    assert "image not found" in reasons[6][0] and reasons[7] == ["missing question"]
    leakage = json.loads((out / "leakage.json").read_text())["test"]
    assert leakage["leaked_test_images"] == 1 and leakage["pairs"][0]["test_image"] == "images/synpic0.jpg"
    assert leakage["leaked_test_questions"] == 1
    assert "leakage test: 1 of 2 test images" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# SLAKE
# ---------------------------------------------------------------------------------------------------------------


def make_slake(root: Path) -> Path:
    for i in range(3):
        save_image(root / "imgs" / f"xmlab{i}" / "source.jpg", 10 + i)

    def rec(qid, img, q, a, kind, lang="en"):
        return {
            "img_id": img,
            "img_name": f"xmlab{img}/source.jpg",
            "question": q,
            "answer": a,
            "answer_type": kind,
            "q_lang": lang,
            "content_type": "Organ",
            "modality": "CT",
            "location": "Lung",
            "base_type": "vqa",
            "qid": qid,
        }

    (root / "train.json").write_text(
        json.dumps(
            [
                rec(1, 0, "Which organ is shown?", "Lung", "OPEN"),
                rec(2, 0, "Is this a CT?", "Yes", "CLOSED"),
                rec(3, 0, "这是CT吗?", "是", "CLOSED", "zh"),
            ]
        )
    )
    (root / "validate.json").write_text(json.dumps([rec(4, 1, "Is the lung healthy?", "No", "CLOSED")]))
    (root / "test.json").write_text(
        json.dumps([rec(5, 2, "What modality?", "CT", "OPEN"), rec(6, 2, "图像是什么?", "CT", "OPEN", "zh")])
    )
    return root


def test_slake_splits_language_filter_and_nested_images(tmp_path, capsys):
    src = make_slake(tmp_path / "Slake1.0")
    out = tmp_path / "out"
    assert slake.main(["--input", str(src), "--output", str(out), "--images", "symlink"]) == 0
    train, val, test = (assert_valid(out, s) for s in ("train", "validate", "test"))
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    assert (
        train[0]["images"] == ["images/xmlab0/source.jpg"] and (out / "images/xmlab0/source.jpg").is_symlink()
    )
    assert test[0]["images"] == ["images/xmlab2/source.jpg"]
    assert train[0]["modality"] == "CT" and train[0]["question_type"] == "Organ"
    assert "train:zh 1" in capsys.readouterr().out
    out_all = tmp_path / "all"
    assert slake.main(["--input", str(src), "--output", str(out_all), "--all-languages"]) == 0
    assert len(assert_valid(out_all, "train")) == 3 and len(assert_valid(out_all, "test")) == 2


# ---------------------------------------------------------------------------------------------------------------
# PathVQA
# ---------------------------------------------------------------------------------------------------------------


def test_pathvqa_original_pickle_layout(tmp_path):
    src, out = tmp_path / "pvqa", tmp_path / "out"
    for split, names in {
        "train": ["train_0001", "train_0002"],
        "val": ["val_0001"],
        "test": ["test_0001"],
    }.items():
        for i, name in enumerate(names):
            save_image(src / "images" / split / f"{name}.jpg", 20 + i + len(split))
        qas = [{"image": n, "question": f"Is there necrosis in {n}?", "answer": "yes"} for n in names]
        qas.append({"image": names[0], "question": "What is present?", "answer": "granuloma"})
        (src / "qas" / split).mkdir(parents=True)
        (src / "qas" / split / f"{split}_qa.pkl").write_bytes(pickle.dumps(qas))
    assert pathvqa.main(["--input", str(src), "--output", str(out), "--leak-distance", "-1"]) == 0
    train, val, test = (assert_valid(out, s) for s in ("train", "validate", "test"))
    assert (len(train), len(val), len(test)) == (3, 2, 2)
    assert [r["answer_type"] for r in test] == [CLOSED, OPEN]
    assert not (out / "leakage.json").exists()


def test_pathvqa_refuses_pickles_that_run_code(tmp_path):
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_qa.pkl").write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(ValueError, match="refusing to load"):
        pathvqa.convert(tmp_path, tmp_path / "out")


def test_pathvqa_parquet_layout_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(seed):
        buf = io.BytesIO()
        random_image(seed, size=(32, 32)).save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "data").mkdir()
    for split, n in (("train", 3), ("validation", 1), ("test", 2)):
        table = pa.table(
            {
                "image": [{"bytes": png(i), "path": None} for i in range(n)],
                "question": [f"q{i}?" for i in range(n)],
                "answer": ["yes", "no", "fibrosis"][:n],
            }
        )
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "out"
    assert pathvqa.main(["--input", str(tmp_path / "data"), "--output", str(out)]) == 0
    train, val, test = (assert_valid(out, s) for s in ("train", "validate", "test"))
    assert [r["answer_type"] for r in train] == [CLOSED, CLOSED, OPEN]
    assert len(val) == 1 and len(test) == 2
    assert len({p for r in train for p in r["images"]}) == 3
    leakage = json.loads((out / "leakage.json").read_text())
    assert leakage["test"]["leaked_test_images"] == 2  # the test images are the first train images again


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Med eval test.json
# ---------------------------------------------------------------------------------------------------------------


def test_llava_med_eval_test_json(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    save_image(src / "images" / "synpic7.jpg", 3)
    records = [
        {
            "id": 11,
            "image": "synpic7.jpg",
            "answer_type": "CLOSED",
            "conversations": [
                {"from": "human", "value": "<image>\nIs there a fracture?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": 12,
            "image": "synpic7.jpg",
            "answer_type": "OPEN",
            "conversations": [
                {"from": "human", "value": "Which bone?\n<image>"},
                {"from": "gpt", "value": "The left femur"},
            ],
        },
        {"id": 13, "image": "nope.jpg", "answer_type": "OPEN", "conversations": []},
    ]
    (src / "test.json").write_text(json.dumps(records))
    assert llava_med_eval.main(["--input", str(src), "--output", str(out)]) == 0
    test = assert_valid(out, "test")
    assert [(r["id"], r["answer_type"], vqa_answer(r)) for r in test] == [
        ("llava_med_eval-11", CLOSED, "no"),
        ("llava_med_eval-12", OPEN, "The left femur"),
    ]
    assert len(read_rows(out / "rejected.jsonl")) == 1


# ---------------------------------------------------------------------------------------------------------------
# Validator CLI
# ---------------------------------------------------------------------------------------------------------------


def test_validator_rejects_injected_defects_with_reasons(tmp_path, capsys):
    save_image(tmp_path / "ok.png", 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = make_vqa_row("ok-1", ["ok.png"], "Is there a mass?", "yes", CLOSED)
    rows = [json.dumps(good)]
    defects = {
        "missing": make_vqa_row("d-missing", ["none.png"], "Q?", "no", CLOSED),
        "corrupt": make_vqa_row("d-corrupt", ["bad.png"], "Q?", "no", CLOSED),
        "placeholders": {**make_vqa_row("d-ph", ["ok.png"], "Q?", "no"), "images": ["ok.png", "ok.png"]},
        "roles": {**good, "id": "d-roles", "messages": good["messages"][::-1]},
        "empty": make_vqa_row("d-empty", ["ok.png"], "Q?", " "),
        "duplicate": good,
    }
    rows += [json.dumps(r) for r in defects.values()] + ["{not json"]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    assert validate.main([str(path)]) == 1
    rejected = {
        r["where"].rsplit(":", 1)[1]: " | ".join(r["reasons"])
        for r in read_rows(tmp_path / "data.rejected.jsonl")
    }
    assert len(rejected) == 7
    assert "image not found" in rejected["2"]
    assert "image does not decode" in rejected["3"]
    assert "1 image placeholder(s) in the messages but 2 image(s)" in rejected["4"]
    assert "roles must alternate" in rejected["5"]
    assert "empty assistant turn" in rejected["6"]
    assert "duplicate id 'ok-1' (first on line 1)" in rejected["7"]
    assert "malformed JSON" in rejected["8"]
    printed = capsys.readouterr().out
    header, _, counts = printed.splitlines()[:3]
    assert [c.strip() for c in counts.split("|")[2:5]] == ["8", "1", "7"], printed  # rows, valid, rejected
    assert validate.main([str(path), "--allow-rejects"]) == 0


def test_validator_token_limit_and_clean_file(tmp_path, tiny_model_dir):
    save_image(tmp_path / "ok.png", 1)
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps(make_vqa_row("a", ["ok.png"], "Is there a mass?", "yes", CLOSED)) + "\n")
    assert validate.main([str(path), "--model", str(tiny_model_dir), "--max-tokens", "4096"]) == 0
    assert validate.main([str(path), "--model", str(tiny_model_dir), "--max-tokens", "8"]) == 1
    assert "tokens > max 8" in read_rows(tmp_path / "clean.rejected.jsonl")[0]["reasons"][0]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1 captions
# ---------------------------------------------------------------------------------------------------------------


def test_captions_from_alignment_json_and_csv(tmp_path):
    for i in range(30):
        save_image(tmp_path / "pmc" / f"PMC{i}" / "fig1.jpg", i)
    records = [
        {
            "id": f"PMC{i}_fig1",
            "image": f"PMC{i}/fig1.jpg",
            "conversations": [
                {"from": "human", "value": "Describe the image concisely.\n<image>"},
                {"from": "gpt", "value": f"Axial CT number {i} showing a lesion."},
            ],
        }
        for i in range(30)
    ]
    records.append({"id": "gone", "image": "PMC99/fig.jpg", "conversations": records[0]["conversations"]})
    src = tmp_path / "llava_med_alignment_500k.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "stage1" / "train.jsonl"
    assert (
        captions.main(["--input", str(src), "--image-root", str(tmp_path / "pmc"), "--output", str(out)]) == 0
    )
    rows = read_rows(out)
    assert len(rows) == 30 and all(validate_row(r, out.parent) == [] for r in rows)
    assert vqa_answer(rows[3]) == "Axial CT number 3 showing a lesion."
    instructions = {r["messages"][0]["content"][1]["text"] for r in rows}
    assert len(instructions) >= 8 and instructions <= set(captions.BRIEF_INSTRUCTIONS)
    assert "image not found" in read_rows(out.with_suffix(".rejected.jsonl"))[0]["reasons"][0]
    again = tmp_path / "again.jsonl"
    captions.main(["--input", str(src), "--image-root", str(tmp_path / "pmc"), "--output", str(again)])
    assert [r["messages"] for r in read_rows(again)] == [r["messages"] for r in rows]  # deterministic

    csv_path = tmp_path / "pmc" / "pairs.csv"
    csv_path.write_text('image,caption\nPMC1/fig1.jpg,"Chest X-ray, frontal view."\nPMC2/fig1.jpg,\n')
    out_csv = tmp_path / "csv.jsonl"
    assert captions.main(["--input", str(csv_path), "--output", str(out_csv)]) == 0
    rows = read_rows(out_csv)
    assert len(rows) == 1 and vqa_answer(rows[0]) == "Chest X-ray, frontal view."
    assert validate_row(rows[0], tmp_path) == []
    assert "empty caption" in read_rows(out_csv.with_suffix(".rejected.jsonl"))[0]["reasons"][0]


# ---------------------------------------------------------------------------------------------------------------
# Preferences
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def vqa_file(tmp_path):
    save_image(tmp_path / "a.png", 0)
    rows = [
        make_vqa_row("q1", ["a.png"], "Is there a mass?", "yes", CLOSED),
        make_vqa_row("q2", ["a.png"], "Which side is the effusion?", "Left", OPEN, question_type="POS"),
        make_vqa_row("q3", ["a.png"], "How many nodules?", "3", OPEN, question_type="COUNT"),
        make_vqa_row("q4", ["a.png"], "What modality is this?", "CT", OPEN, question_type="MODALITY"),
        make_vqa_row("q5", ["a.png"], "What is the finding?", "pneumonia", OPEN, question_type="POS"),
        make_vqa_row("q6", ["a.png"], "Which lobe?", "upper lobe", OPEN, question_type="POS"),
        make_vqa_row("q7", ["a.png"], "Describe it.", "a long answer with many words in it", OPEN),
        make_vqa_row("q8", ["a.png"], "Which option?", "B", CHOICE),
    ]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_swap_pairs(vqa_file, tmp_path):
    out = tmp_path / "dpo.jsonl"
    assert preferences.main(["dpo-swap", "--input", str(vqa_file), "--output", str(out)]) == 0
    pairs = {r["id"]: r for r in read_rows(out)}
    for row in pairs.values():
        assert validate_row(row, tmp_path) == []
    text = {
        k: (r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"])
        for k, r in pairs.items()
    }
    assert text["q1-swap"] == ("yes", "no")
    assert text["q2-swap"] == ("Left", "Right")
    assert text["q3-swap"][1] in {"1", "2", "4", "5"}
    assert text["q4-swap"] == ("CT", "MRI")
    assert text["q6-swap"] == ("upper lobe", "lower lobe")
    assert "q5-swap" not in pairs and pairs["q1-swap"]["prompt"][-1]["role"] == "user"


def test_dpo_from_wrong_predictions(vqa_file, tmp_path):
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(
        "".join(
            json.dumps(p) + "\n"
            for p in [
                {
                    "id": "q1",
                    "question": "Is there a mass?",
                    "answer": "yes",
                    "prediction": "No.",
                    "answer_type": CLOSED,
                },
                {
                    "id": "q4",
                    "question": "What modality?",
                    "answer": "CT",
                    "prediction": "CT",
                    "answer_type": OPEN,
                },
                {"id": "zz", "question": "?", "answer": "x", "prediction": "y", "answer_type": OPEN},
            ]
        )
    )
    out = tmp_path / "dpo.jsonl"
    assert (
        preferences.main(
            ["dpo-predictions", "--predictions", str(preds), "--data", str(vqa_file), "--output", str(out)]
        )
        == 0
    )
    rows = read_rows(out)
    assert len(rows) == 1 and rows[0]["rejected"][0]["content"][0]["text"] == "No."
    assert validate_row(rows[0], tmp_path) == []
    assert "not found" in read_rows(out.with_suffix(".rejected.jsonl"))[0]["reasons"][0]


def test_grpo_solutions_and_choices(vqa_file, tmp_path):
    out = tmp_path / "grpo.jsonl"
    assert preferences.main(["grpo", "--input", str(vqa_file), "--output", str(out)]) == 0
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["q1-grpo"]["solution"] == "yes" and rows["q1-grpo"]["answer_type"] == CLOSED
    assert rows["q2-grpo"]["solution"] == "Left" and rows["q8-grpo"]["solution"] == "B"
    assert "q7-grpo" not in rows  # long answer left out, counted
    assert all(validate_row(r, tmp_path) == [] for r in rows.values())
    out_mc = tmp_path / "mc.jsonl"
    assert (
        preferences.main(["grpo", "--input", str(vqa_file), "--output", str(out_mc), "--choices", "3"]) == 0
    )
    mc = {r["id"]: r for r in read_rows(out_mc)}
    row = mc["q5-grpo"]
    assert row["answer_type"] == CHOICE and len(row["choices"]) == 3
    assert row["choices"]["ABC".index(row["solution"])] == "pneumonia"
    question = row["prompt"][-1]["content"][-1]["text"]
    assert f"{row['solution']}. pneumonia" in question and row["prompt"][-1]["content"][0] == {
        "type": "image"
    }
    assert validate_row(row, tmp_path) == []


def test_group_turns_merges_questions_per_image(vqa_file, tmp_path):
    save_image(tmp_path / "b.png", 1)
    extra = [
        make_vqa_row("b1", ["b.png"], "Is this a CT?", "no", CLOSED, question_type="MODALITY"),
        make_vqa_row("b2", ["b.png"], "Is this a CT?", "no", CLOSED),  # asked twice: kept once
        {"id": "bad", "images": ["b.png"], "messages": [{"role": "user", "content": "only a question"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text(vqa_file.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    out = tmp_path / "sub" / "grouped.jsonl"
    argv = ["--input", str(src), "--output", str(out), "--max-turns", "3", "--seed", "1"]
    assert group_turns.main(argv) == 0
    rows = read_rows(out)
    for row in rows:
        assert validate_row(row, out.parent) == [], row  # image paths rebased to the output's folder
        assert row["images"] in (["../a.png"], ["../b.png"])
    ids = sorted(i for r in rows for i in r["source_ids"])
    assert ids == ["b1", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]  # b2 duplicate, "bad" rejected
    a_rows = [r for r in rows if r["images"] == ["../a.png"]]
    assert sorted(len(r["source_ids"]) for r in a_rows) == [2, 3, 3]
    for row in rows:
        users = [m for m in row["messages"] if m["role"] == "user"]
        assert [p["type"] for p in users[0]["content"]] == ["image", "text"]
        assert all(p["type"] == "text" for u in users[1:] for p in u["content"])
        assert len(users) == len(row["answer_types"]) == len(row["question_types"]) == len(row["source_ids"])
    rejected = read_rows(out.with_suffix(".rejected.jsonl"))
    assert [r["row"]["id"] for r in rejected] == ["bad"]
    assert group_turns.main(argv) == 0 and read_rows(out) == rows  # same seed, same rows


def test_group_turns_merges_several_files_of_multi_image_rows(tmp_path):
    # prior/current pairs from one file and volume slices from another (make train-multi): grouped per image list
    for name in ("p.png", "c.png", "s1.png", "s2.png"):
        save_image(tmp_path / name, 1)
    pairs = [
        make_vqa_row(f"l{i}", ["p.png", "c.png"], q, a, CLOSED) | {"family": "longitudinal"}
        for i, (q, a) in enumerate([("Has it grown?", "no"), ("Is there a new lesion?", "yes")])
    ]
    slices = [make_vqa_row("v0", ["s1.png", "s2.png"], "On which slice is it largest?", "2", OPEN)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "vol.jsonl").write_text(json.dumps(slices[0] | {"family": "volume"}) + "\n")
    out = tmp_path / "multi.jsonl"
    argv = ["--input", str(tmp_path / "long.jsonl"), str(tmp_path / "vol.jsonl"), "--output", str(out)]
    assert group_turns.main(argv) == 0
    rows = {tuple(r["images"]): r for r in read_rows(out)}
    assert set(rows) == {("p.png", "c.png"), ("s1.png", "s2.png")}
    pair = rows[("p.png", "c.png")]
    assert sorted(pair["source_ids"]) == ["l0", "l1"] and pair["family"] == "longitudinal"
    assert [p["type"] for p in pair["messages"][0]["content"]] == ["image", "image", "text"]
    assert rows[("s1.png", "s2.png")]["family"] == "volume"
    assert all(validate_row(r, tmp_path) == [] for r in rows.values())
    with pytest.raises(SystemExit):
        group_turns.main(["--input", str(tmp_path / "long.jsonl"), str(out), "--output", str(out)])


def test_described_replaces_the_image_by_its_caption_and_keeps_closed_turns(tmp_path):
    for name in ("a.png", "b.png"):
        save_image(tmp_path / name, 1)
    caption_rows = [make_vqa_row("ca", ["a.png"], "Describe the image.", "A CT image of the chest.")]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in caption_rows))
    singles = [
        make_vqa_row("q1", ["a.png"], "Is this an X-ray?", "no", CLOSED, question_type="MODALITY"),
        make_vqa_row("q2", ["a.png"], "What modality is this?", "ct", OPEN, question_type="MODALITY"),
        make_vqa_row("q3", ["a.png"], "Is this the chest?", "yes", CLOSED, question_type="ORGAN"),
        make_vqa_row("q4", ["b.png"], "Is this an MRI?", "no", CLOSED),  # b.png has no caption
    ]
    src = tmp_path / "singles.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in singles))
    grouped = tmp_path / "grouped" / "g.jsonl"  # another folder: images are matched by file, not by spelling
    assert group_turns.main(["--input", str(src), "--output", str(grouped), "--max-turns", "3"]) == 0
    out = tmp_path / "described.jsonl"
    argv = ["--vqa", str(grouped), "--captions", str(tmp_path / "captions.jsonl"), "--output", str(out)]
    assert described.main(argv + ["--answer-types", "CLOSED"]) == 0
    (row,) = read_rows(out)
    assert row["images"] == [] and validate_row(row, tmp_path) == []
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    assert [vqa_answer({"messages": [m]}) for m in row["messages"] if m["role"] == "assistant"] in (
        ["no", "yes"],
        ["yes", "no"],
    )
    assert all(part["type"] == "text" for content in users for part in content)
    assert users[0][0]["text"].startswith("Image description: A CT image of the chest. Is this ")
    assert not users[1][0]["text"].startswith("Image description")
    assert row["answer_types"] == ["CLOSED", "CLOSED"] and sorted(row["question_types"]) == [
        "MODALITY",
        "ORGAN",
    ]
    assert sorted(row["source_ids"]) == ["q1", "q3"]
    rejected = read_rows(out.with_suffix(".rejected.jsonl"))
    assert [r["reasons"] for r in rejected] == [["no caption for ../b.png"]]
    # every turn kept without --answer-types; --fraction keeps a seeded share of the rows
    assert described.main(argv) == 0
    assert sorted(read_rows(out)[0]["source_ids"]) == ["q1", "q2", "q3"]
    with pytest.raises(SystemExit):
        described.main(argv + ["--fraction", "0"])
