"""eval.diagnostics.yesno: first-token yes/no preference on closed questions, scored as ROC AUC per question type."""

import json

import pytest
from conftest import random_image

from eval.diagnostics.yesno import best_threshold_accuracy, main, roc_auc


def test_roc_auc_and_best_threshold():
    assert roc_auc([3.0, 2.0, 1.0, 0.0], [True, True, False, False]) == 1.0
    assert roc_auc([0.0, 1.0, 2.0, 3.0], [True, True, False, False]) == 0.0
    assert roc_auc([1.0, 1.0], [True, False]) == 0.5  # a tie counts half
    assert roc_auc([1.0, 2.0], [True, True]) is None  # no negative
    # every score equal: the best rule answers the majority
    assert best_threshold_accuracy([0.0] * 4, [True, True, True, False]) == 0.75
    assert best_threshold_accuracy([-2.0, -1.0, 1.0, 2.0], [False, False, True, True]) == 1.0


def _row(i, question, answer, answer_type, question_type):
    return {
        "id": f"q{i}",
        "images": [f"img{i % 3}.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "answer_type": answer_type,
        "question_type": question_type,
    }


def test_yesno_scores_closed_questions_per_type(tiny_model_dir, tmp_path):
    for i in range(3):
        random_image(i).save(tmp_path / f"img{i}.png")
    rows = [
        _row(i, f"Is this a CT image ({i})?", "yes" if i % 2 else "no", "CLOSED", "MODALITY")
        for i in range(6)
    ]
    rows += [
        _row(6, "Is there a lesion?", "no", "CLOSED", "PRES"),
        _row(7, "What organ?", "liver", "OPEN", "ORGAN"),
    ]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "yesno.json"
    main(["--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "4", "--output", str(out)])
    result = json.loads(out.read_text())["by_type"]
    assert list(result) == ["ALL", "MODALITY", "PRES"]  # the open question is not scored
    assert result["ALL"]["n"] == 7 and result["MODALITY"]["n"] == 6 and result["MODALITY"]["yes_share"] == 0.5
    assert 0.0 <= result["MODALITY"]["auc"] <= 1.0 and result["PRES"]["auc"] is None  # one class only
    assert result["PRES"]["best_threshold_acc"] == 1.0
    assert 0.0 < result["ALL"]["yes_no_mass"] < 1.0


def test_yesno_refuses_a_file_without_closed_questions(tiny_model_dir, tmp_path):
    data = tmp_path / "open.jsonl"
    data.write_text(json.dumps(_row(0, "What organ?", "liver", "OPEN", "ORGAN")) + "\n")
    with pytest.raises(SystemExit, match="no CLOSED questions"):
        main(["--model", str(tiny_model_dir), "--data", str(data)])


def test_tell_puts_the_rows_fact_before_the_question(tmp_path):
    from eval.diagnostics.yesno import tell
    from eval.generate import load_questions
    from medllava.schema import SchemaError

    rows = [_row(0, "Is this a CT image?", "no", "CLOSED", "MODALITY") | {"modality": "MRI"}]
    rows.append(_row(1, "Is this an MRI?", "yes", "CLOSED", "MODALITY"))  # no modality field
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_questions(data, None, {"CLOSED": "Answer yes or no."})
    told = tell(questions[:1], data, "This is a {modality} image.")
    assert told[0].messages[-1]["content"][-1]["text"] == (
        "This is a MRI image. Is this a CT image? Answer yes or no."
    )
    assert told[0].messages[-1]["content"][0] == {"type": "image"}
    assert questions[0].messages[-1]["content"][-1]["text"] == "Is this a CT image? Answer yes or no."
    with pytest.raises(SchemaError, match="vqa.jsonl:2: --tell needs the field 'modality'"):
        tell(questions, data, "This is a {modality} image.")
