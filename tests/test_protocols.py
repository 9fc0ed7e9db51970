"""Each harness protocol re-derived by hand on predictions that hit its edge cases (eval.protocols, eval.score)."""

from __future__ import annotations

import json

import pytest

from eval.protocols import (
    PROTOCOLS,
    boxed_content,
    dataset_of,
    get_protocols,
    lmms_normalize,
    mek_judge_multi_choice,
    mek_parse_response,
    notes_of,
    pooled_by_id,
    score_protocol,
    split_values,
    squad_normalize,
    tokenized_f1,
    vlmevalkit_correctness,
)


def rows(*cases):
    """(prediction, answer, answer_type[, extra]) -> prediction rows with ids q0, q1, ..."""
    out = []
    for i, case in enumerate(cases):
        prediction, answer, answer_type = case[:3]
        extra = case[3] if len(case) > 3 else {}
        out.append(
            {"id": f"q{i}", "prediction": prediction, "answer": answer, "answer_type": answer_type, **extra}
        )
    return out


def values(protocol: str, cases, dataset: str = "other"):
    scores = score_protocol(PROTOCOLS[protocol], rows(*cases), dataset)
    return [(s.group, s.value, s.overall) for s in scores.values()], split_values(scores), scores


def mean(xs):
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------------------------
# MedEvalKit (utils/utils.py, VQA_RAD.py / PATH_VQA.py, SLAKE.py, PMC_VQA.py)
# ---------------------------------------------------------------------------------------------------------------


def test_medevalkit_parsing_quirks():
    assert boxed_content(r"so \boxed{Yes} it is") == "Yes"
    assert boxed_content(r"\boxed{a{b}c} and \boxed{ last }") == "last"
    assert boxed_content(r"\boxed{unclosed") == "None"
    assert boxed_content("no box") == "None"
    # Patterns split in turn and nothing is stripped afterwards.
    assert mek_parse_response("The answer is Left") == " left"
    assert mek_parse_response("Final answer: the liver") == " the liver"
    assert mek_parse_response("<answer>A</answer> and <answer>B</answer>") == "a b"
    # The word "boxed" without a \boxed{...}: the whole text becomes the string "None".
    assert mek_parse_response("it is boxed in") == "None"


def test_medevalkit_vqa_rad_variant():
    cases = [
        ("Yes, there is.", "yes", "CLOSED"),  # only "yes": 1
        ("No, not yes.", "no", "CLOSED"),  # both yes and no present: 0
        ("Abnormal", "no", "CLOSED"),  # "no" inside "abnormal", no "yes": 1
        ("Unknown", "yes", "CLOSED"),  # "no" inside "unknown": 0
        (r"\boxed{Yes}", "yes", "CLOSED"),  # boxed content taken first: 1
        ("it is boxed in", "yes", "CLOSED"),  # parse -> "None": neither yes nor no: 0
        ("The answer is left", "left", "OPEN"),  # " left" != "left": 0
        ("Left.", "left", "OPEN"),  # periods stay for open answers: 0
        ("<answer>left</answer>", "Left ", "OPEN"),  # tag extracted, answer lowercased and stripped: 1
        ("left", "left", "CLOSED"),  # closed by dataset, but a non-yes/no answer is scored as open: 1
        ("", "liver", "OPEN"),  # MedEvalKit would crash here; we score 0 and count it
    ]
    per_q, split, scores = values("medevalkit", cases, "vqa_rad")
    assert [v for _, v, _ in per_q] == [1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0]
    assert [g for g, _, _ in per_q] == ["closed"] * 6 + ["open"] * 5
    assert split["closed"] == [1, 0, 1, 0, 1, 0] and mean(split["closed"]) == pytest.approx(3 / 6)
    assert mean(split["open"]) == pytest.approx(2 / 5)
    assert mean(split["overall"]) == pytest.approx(5 / 11)  # right / total
    assert notes_of(scores) == {"empty open response: MedEvalKit's calculate_f1 would raise (TypeError)": 1}
    # PathVQA is scored by the same code.
    assert values("medevalkit", cases, "pathvqa")[0] == per_q


def test_medevalkit_slake_variant():
    cases = [
        ("Liver", "Liver", "OPEN"),  # parse lowercases, answer.lower(): 1
        (" liver", "liver", "OPEN"),  # SLAKE's path strips nothing: 0
        (
            "yes, it is",
            "Yes",
            "CLOSED",
        ),  # "Yes" is not literally yes/no: exact match after dropping periods: 0
        ("yes, it is", "yes", "CLOSED"),  # a literal "yes": the yes/no judgement: 1
        ("Left.", "Left", "CLOSED"),  # period dropped, exact: 1
        ("Yes", "Left", "CLOSED"),  # 0
    ]
    per_q, split, _ = values("medevalkit", cases, "slake")
    assert [v for _, v, _ in per_q] == [1, 0, 0, 1, 1, 0]
    assert [g for g, _, _ in per_q] == ["open", "open", "closed", "closed", "closed", "closed"]
    assert mean(split["overall"]) == pytest.approx(3 / 6)


def test_medevalkit_multiple_choice():
    choices = ["CT", "MRI", "X-ray", "Ultrasound"]
    assert mek_judge_multi_choice(choices, "B", "B")
    assert mek_judge_multi_choice(choices, "B", "B. MRI\n\nbecause of the contrast") is True
    assert not mek_judge_multi_choice(choices, "B", "The answer is C")
    assert mek_judge_multi_choice(choices, "B", "MRI")  # the option text itself
    assert mek_judge_multi_choice(choices, "B", "mri scan")  # the most similar option (difflib ratio)
    assert not mek_judge_multi_choice(choices, "B", "ultrasound probe image")
    per_q, split, scores = values(
        "medevalkit", [("b", "B", "CHOICE", {"choices": choices}), ("C", "B", "CHOICE")], "pmc_vqa"
    )
    assert per_q[0] == ("closed", 1.0, 1.0)
    assert per_q[1] == (None, None, None)  # no choices: not scored, counted
    assert sum(notes_of(scores).values()) == 1


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval (lmms_eval/tasks/slake/utils.py)
# ---------------------------------------------------------------------------------------------------------------


def test_lmms_eval_normalisation():
    assert lmms_normalize(" Yes. ") == "yes"
    assert lmms_normalize("Yes, it is.") == "yes it is"
    assert lmms_normalize("X-Ray") == lmms_normalize("xray") == "xray"
    assert lmms_normalize("CT (computed tomography)") == "ct"
    assert lmms_normalize("true") == "yes" and lmms_normalize("Nope") == "no"
    assert lmms_normalize("是的。") == "yes" and lmms_normalize("不正常") == "no"
    assert lmms_normalize("Left Lung, Right") == "left lung right"
    assert lmms_normalize(None) == ""


def test_lmms_eval_scores_and_aggregation():
    cases = [
        ("Yes.", "yes", "CLOSED"),  # 1
        ("Yes, it is.", "yes", "CLOSED"),  # 0: exact match only
        ("true", "Yes", "CLOSED"),  # synonym: 1
        ("X-Ray", "xray", "OPEN"),  # 1
        ("the left lung", "Left Lung,", "OPEN"),  # articles are kept: 0
        ("B", "B", "CHOICE"),  # counted in the overall accuracy only: 1
    ]
    per_q, split, _ = values("lmms_eval", cases, "slake")
    assert [v for _, v, _ in per_q] == [1, 0, 1, 1, 0, 1]
    assert mean(split["closed"]) == pytest.approx(2 / 3)
    assert mean(split["open"]) == pytest.approx(1 / 2)
    assert mean(split["overall"]) == pytest.approx(4 / 6)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Med v1.0 (run_eval.py at v1.0.0)
# ---------------------------------------------------------------------------------------------------------------


def test_llava_med_protocol():
    cases = [
        ("Abnormal", "no", "CLOSED"),  # "no" is a substring of "abnormal" and yes/no is "present": 1
        ("Not sure", "yes", "CLOSED"),  # 0
        ("The lesion is in the left lung.", "left lung", "OPEN"),  # recall 2/2
        ("lung", "left lung", "OPEN"),  # recall 1/2
        ("<answer>left</answer>", "left", "OPEN"),  # no tag extraction; "<", ">", "/" become spaces: recall 1
        ("B", "B", "CHOICE"),  # not scored
    ]
    per_q, split, scores = values("llava_med", cases)
    assert [v for _, v, _ in per_q] == [1, 0, 1.0, 0.5, 1.0, None]
    assert split["overall"] is None  # LLaVA-Med reports no overall number
    assert mean(split["closed"]) == pytest.approx(0.5)
    assert mean(split["open"]) == pytest.approx(2.5 / 3)
    assert split["pooled"] == [1, 0, 1.0, 0.5, 1.0]
    assert pooled_by_id(scores) == {"q0": 1.0, "q1": 0.0, "q2": 1.0, "q3": 0.5, "q4": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# ours (medllava.metrics strict)
# ---------------------------------------------------------------------------------------------------------------


def test_ours_protocol():
    cases = [
        ("Yes, no idea", "yes", "CLOSED"),  # both words: 0
        ("<answer>yes</answer>", "yes", "CLOSED"),  # tags extracted: 1
        ("the left lung", "left lung", "OPEN"),  # token F1 1.0 (articles dropped)
        ("left", "left lung", "OPEN"),  # 2/3
        ("(B)", "B", "CHOICE"),  # letter, counted as closed: 1
    ]
    per_q, split, _ = values("ours", cases)
    assert [v for _, v, _ in per_q] == pytest.approx([0, 1, 1, 2 / 3, 1])
    assert mean(split["closed"]) == pytest.approx(2 / 3)
    assert mean(split["overall"]) == pytest.approx((0 + 1 + 1 + 2 / 3 + 1) / 5)


# ---------------------------------------------------------------------------------------------------------------
# MedGemma (tokenized F1 with SQuAD normalisation; closed-subset accuracy)
# ---------------------------------------------------------------------------------------------------------------


def test_medgemma_protocol():
    assert squad_normalize("The Left, lung!") == "left lung"
    assert tokenized_f1("", "") == 1.0 and tokenized_f1("", "liver") == 0.0
    cases = [
        ("Yes.", "yes", "CLOSED"),  # EM 1, F1 1
        (
            "Yes, there is a lesion.",
            "yes",
            "CLOSED",
        ),  # EM 0; tokens yes there is lesion: P 1/4, R 1 -> F1 0.4
        ("the left lung", "left lung", "OPEN"),  # F1 1
        ("left", "left lung", "OPEN"),  # P 1, R 1/2 -> 2/3
    ]
    per_q, split, _ = values("medgemma", cases)
    assert per_q == [
        ("closed", 1.0, 1.0),
        ("closed", 0.0, pytest.approx(0.4)),
        ("open", 1.0, 1.0),
        ("open", pytest.approx(2 / 3), pytest.approx(2 / 3)),
    ]
    assert mean(split["closed"]) == 0.5
    assert mean(split["overall"]) == pytest.approx((1 + 0.4 + 1 + 2 / 3) / 4)


# ---------------------------------------------------------------------------------------------------------------
# VLMEvalKit (judge verdicts, ShortQA_auxeval's extraction, report_acc)
# ---------------------------------------------------------------------------------------------------------------


def test_vlmevalkit_extraction_and_aggregation():
    assert vlmevalkit_correctness("[Begin Correctness] Yes [End Correctness]") == 1
    assert vlmevalkit_correctness("x [Begin Correctness]no[End Correctness][Begin Reason]r[End Reason]") == 0
    assert vlmevalkit_correctness("[Begin Correctness]Not correct[End Correctness]") == 0  # "no" in "not"
    assert vlmevalkit_correctness("[Begin Correctness]yes or no[End Correctness]") is None
    assert vlmevalkit_correctness("Correctness: yes") is None
    cases = [
        ("yes", "yes", "CLOSED", {"judge_hit": 1}),
        ("left", "right", "OPEN", {"judge_hit": 0}),
        ("liver", "liver", "OPEN", {"judge_hit": 1}),
        ("kidney", "liver", "OPEN"),  # no verdict: not scored
    ]
    per_q, split, scores = values("vlmevalkit", cases)
    assert [v for _, v, _ in per_q] == [1, 0, 1, None]
    assert mean(split["overall"]) == pytest.approx(2 / 3)
    assert sum(notes_of(scores).values()) == 1


# ---------------------------------------------------------------------------------------------------------------
# The same predictions, different numbers; registry and eval.score --protocol
# ---------------------------------------------------------------------------------------------------------------


def test_same_predictions_different_protocols():
    """A verbose but right model: LLaVA-Med and MedEvalKit count it right, lmms-eval and ours do not."""
    cases = [
        ("Yes, there is a nodule in the left lung.", "yes", "CLOSED"),
        ("No, it does not.", "no", "CLOSED"),
    ]
    closed = {
        name: mean(values(name, cases, "vqa_rad")[1]["closed"])
        for name in ("llava_med", "medevalkit", "lmms_eval", "ours")
    }
    # "nodule" contains "no": LLaVA-Med still counts the first (yes/no present, "yes" a substring); MedEvalKit
    # sees both "yes" and "no" and counts it wrong.
    assert closed == {"llava_med": 1.0, "medevalkit": 0.5, "lmms_eval": 0.0, "ours": 1.0}


def test_registry_and_dataset_keys():
    assert [p.name for p in get_protocols(None)] == list(PROTOCOLS)
    assert [p.name for p in get_protocols("medgemma, ours,medgemma")] == ["medgemma", "ours"]
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocols("ours,nope")
    assert dataset_of("vqa_rad") == "vqa_rad" and dataset_of("llava_med_vqa_rad") == "vqa_rad"
    assert dataset_of("Path-VQA") == "pathvqa" and dataset_of("SLAKE") == "slake"
    assert dataset_of("medsynth") == "medsynth" and dataset_of(None) == "other"
    for protocol in PROTOCOLS.values():
        assert protocol.mirrors and protocol.title


def test_score_cli_protocol(tmp_path, capsys):
    from eval import score

    predictions = tmp_path / "predictions.jsonl"
    lines = rows(
        ("Abnormal", "no", "CLOSED"), ("Yes", "yes", "CLOSED"), ("The answer is left", "left", "OPEN")
    )
    predictions.write_text("".join(json.dumps({**r, "source": "vqa_rad"}) + "\n" for r in lines))
    score.main(
        [
            "--predictions",
            str(predictions),
            "--output",
            str(tmp_path / "out"),
            "--protocol",
            "medevalkit,lmms_eval",
            "--bootstrap",
            "20",
        ]
    )
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    protocols = next(iter(report["runs"].values()))["protocols"]
    assert list(protocols) == ["medevalkit", "lmms_eval"]
    assert protocols["medevalkit"]["closed"]["mean"] == 1.0  # "abnormal" counts as "no"
    assert protocols["medevalkit"]["open"]["mean"] == 0.0  # " left" != "left"
    assert protocols["lmms_eval"]["closed"]["mean"] == 0.5
    assert protocols["medevalkit"]["overall"]["mean"] == pytest.approx(2 / 3)
    assert "Under each harness's protocol" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        score.main(
            ["--predictions", str(predictions), "--output", str(tmp_path / "o2"), "--protocol", "nope"]
        )
