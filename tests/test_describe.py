"""eval.diagnostics.describe: fact recall of "Describe this image." replies, contradictions and loops."""

import json

import pytest
from conftest import random_image

from eval.diagnostics.describe import (
    Chat,
    chat_row,
    is_looping,
    main,
    read_chats,
    score_facts,
    stated,
    summarise,
)
from medllava.schema import SchemaError

CT_TWO = {
    "modality": "CT",
    "region": "head",
    "lesion_count": 2,
    "side": "left",
    "position": "upper",
    "quadrant": "upper left",
    "size": "small",
    "contrast": "dark",
}
FUNDUS_NONE = {"modality": "fundus photograph", "region": "eye", "lesion_count": 0}


def hits(text, facts):
    return {k: v["hit"] for k, v in score_facts(text, facts).items()}


def contradicted(text, facts):
    return {k for k, v in score_facts(text, facts).items() if v["contradicted"]}


def test_a_true_description_hits_every_fact_and_contradicts_none():
    text = "This is a CT image of the head. There are two small hypodense lesions in the upper left."
    assert hits(text, CT_TWO) == {"modality": True, "region": True, "lesion_count": True, "position": True}
    assert contradicted(text, CT_TWO) == set()
    text = "This is a fundus photograph of the retina. No focal lesion is seen."
    assert hits(text, FUNDUS_NONE) == {"modality": True, "region": True, "lesion_count": True}  # no position
    assert contradicted(text, FUNDUS_NONE) == set()


@pytest.mark.parametrize(
    "text, modality, region",
    [
        ("An MR image of the brain.", "MRI", "head"),
        ("A magnetic resonance scan of the skull.", "MRI", "head"),
        ("A plain radiograph of the knee.", "X-ray", "leg"),
        ("An xray of the lower limb.", "X-ray", "leg"),
        ("Computed tomography of the lumbar spine.", "CT", "spine"),
        ("A sonogram of the pelvic organs.", "ultrasound", "pelvis"),
        ("An echocardiogram.", "ultrasound", "heart"),
        ("A whole-body bone scintigraphy.", "nuclear medicine", "whole body"),
        ("A microscopy image of colonic tissue.", "histology", "colon"),
        ("A histological slide of skin tissue.", "histology", "skin"),
        ("An ultrasound of a lymph node.", "ultrasound", "lymph node"),
    ],
)
def test_synonyms_name_modality_and_region(text, modality, region):
    s = stated(text)
    assert s.modality == {modality} and s.region == {region}


@pytest.mark.parametrize(
    "text, count",
    [
        ("No focal lesion is seen.", 0),
        ("There are no lesions.", 0),
        ("I do not see any nodule.", 0),
        ("An image without any focal abnormality.", 0),
        ("There is a lesion.", 1),
        ("A single bright nodule.", 1),
        ("There is one large hyperechoic focal lesion.", 1),
        ("Two small dark lesions.", 2),
        ("There are 2 nodules.", 2),
        ("Three large, bright lesions.", 3),
    ],
)
def test_counts(text, count):
    assert stated(text).counts == [frozenset({count})]


def test_phrases_that_state_no_count():
    # "one of the lesions" does not say one; "lesion-free" names no lesion; "no other" does not say none
    assert stated("One of the lesions is larger.").counts == []
    assert stated("A lesion-free radiograph.").counts == []
    assert stated("There is a lesion; there are no other lesions.").counts == [frozenset({1})]


def test_contradictions():
    assert contradicted("This is an MRI of the head with two lesions.", CT_TWO) == {"modality"}
    assert contradicted("A CT image of the chest.", CT_TWO) == {"region"}
    assert contradicted("A CT of the head. No focal lesion is seen.", CT_TWO) == {"lesion_count"}
    assert contradicted("Three lesions in the upper left.", CT_TWO) == {"lesion_count"}
    assert contradicted("Two lesions in the lower right.", CT_TWO) == {"position"}
    # naming the true value and another one: a hit and a contradiction
    both = score_facts("A CT or MRI image.", CT_TWO)["modality"]
    assert both == {"hit": True, "contradicted": True}
    # "several" allows two (neither hit nor contradiction) but not one
    assert score_facts("Several lesions.", CT_TWO)["lesion_count"] == {"hit": False, "contradicted": False}
    one = {**CT_TWO, "lesion_count": 1}
    assert score_facts("Several lesions.", one)["lesion_count"] == {"hit": False, "contradicted": True}
    # a lesion in the picture: anatomy words ("left ventricle", "lower limb") are not positions
    s = stated("The left ventricle and the lower limb.")
    assert s.side == set() and s.vertical == set()
    assert hits("Two lesions in the left side, in the upper half.", CT_TWO)["position"]
    assert not hits("Two lesions on the left.", CT_TWO)["position"]  # upper/lower not said


@pytest.mark.parametrize(
    "text, finished",
    [
        ("ct-m-m-m-m-m-m", True),
        ("the the the the", True),
        ("This is an X-ray. Lesion lesion lesion lesion lesion", True),
        ("There is one lesion. There is one lesion. There is one lesion. There is one lesion.", True),
        ("hmmmmmmmmm", True),
        # at the token limit three repeats are enough, the last one may be cut off
        ("A CT of the head. The lesion is large. The lesion is large. The lesion is large. The", False),
        ("This is an MRI image of the head and and and", False),
        ("A bright lesion!!!!!!", False),
    ],
)
def test_looping_replies(text, finished):
    assert is_looping(text, finished)


@pytest.mark.parametrize(
    "text, finished",
    [
        ("This is a CT image of the head. There are two lesions; the lesions are small.", True),
        ("This is a CT image of the head. There are two lesions; the lesions are small.", False),
        ("The lesion is large. The lesion is bright.", False),  # two repeats only
        ("lesion lesion", True),
        ("and and and", True),  # three repeats of a finished reply are not a loop
        ("Size: 10000 pixels...", False),
        ("A bright lesion!!!!!!", True),  # no word repeated, and ended by itself
        ("", True),
    ],
)
def test_not_looping(text, finished):
    assert not is_looping(text, finished)


def test_a_hand_fed_chat_is_scored():
    chat = Chat("c0", 1, "img.png", CT_TWO, ["Describe this image.", "How many lesions are there?"])
    chat.replies = ["This is an MRI image of the head with two lesions.", "two two two two"]
    chat.finished = [True, False]
    row = chat_row(chat)
    assert row["recall"] == 0.5  # region and count of modality, region, count, position
    assert row["scores"]["modality"] == {"hit": False, "contradicted": True}
    assert [t["looping"] for t in row["turns"]] == [False, True] and row["looping"]
    other = Chat("c1", 2, "img2.png", FUNDUS_NONE, ["Describe this image."])
    other.replies, other.finished = ["A fundus photograph of the retina. No lesion is seen."], [True]
    summary = summarise([row, chat_row(other)])
    assert list(summary) == ["ALL", "CT", "fundus photograph"]
    everything = summary["ALL"]
    assert everything["recall_pooled"] == 5 / 7 and everything["recall_mean_per_image"] == 0.75
    assert everything["contradiction_rate"] == 1 / 7
    assert everything["position"] == {"n": 1, "recall": 0.0, "contradicted": 0.0}
    assert everything["looping_replies"] == 1 and everything["looping_chats"] == 1
    assert everything["replies"] == 3 and everything["replies_at_limit"] == 1
    assert summary["fundus photograph"]["recall_pooled"] == 1.0


def _write_captions(tmp_path, facts_list, missing=()):
    rows = []
    for i, facts in enumerate(facts_list):
        if i not in missing:
            random_image(i, size=(32, 32)).save(tmp_path / f"img{i}.png")
        rows.append(
            {
                "id": f"cap{i}",
                "images": [f"img{i}.png"],
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "A caption."}]},
                ],
                "facts": facts,
            }
        )
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    mri = {**CT_TWO, "modality": "MRI", "lesion_count": 1, "side": "right", "position": "lower"}
    data = _write_captions(tmp_path, [CT_TWO, FUNDUS_NONE, mri])
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]
    result = main([*args, "--batch-size", "2", "--max-new-tokens", "6"])
    rows = [json.loads(line) for line in (out / "describe.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["cap0", "cap1", "cap2"]
    # the lesion follow-up is asked only about the images with lesions
    assert [len(r["turns"]) for r in rows] == [3, 2, 3]
    assert rows[1]["turns"][1]["question"] == "How many lesions are there?"
    assert rows[0]["turns"][2]["question"] == "Where is the lesion?"
    for r in rows:
        assert set(r["scores"]) == (
            {"modality", "region", "lesion_count"} | ({"position"} if r["facts"]["lesion_count"] else set())
        )
        # the stored scores are those of the stored description, rescored here
        assert r["scores"] == score_facts(r["turns"][0]["reply"], r["facts"])
        assert all(t["looping"] == is_looping(t["reply"], t["finished"]) for t in r["turns"])
        assert 0.0 <= r["recall"] <= 1.0
    summary = json.loads((out / "describe.json").read_text())["summary"]
    assert summary == result["summary"] and summary["ALL"]["chats"] == 3 and summary["ALL"]["replies"] == 8
    for key in ("recall_pooled", "recall_mean_per_image", "contradiction_rate"):
        assert 0.0 <= summary["ALL"][key] <= 1.0
    assert set(summary) == {"ALL", "CT", "MRI", "fundus photograph"}
    table = (out / "describe.md").read_text()
    assert table.startswith("| modality | chats |") and "chats (" in table

    # the description alone: no follow-up at all
    main([*args, "--follow-up", "--lesion-follow-up", "--limit", "1", "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (out / "describe.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["turns"]) == 1


def test_bad_rows_are_named(tmp_path):
    data = _write_captions(tmp_path, [CT_TWO, FUNDUS_NONE], missing=(1,))
    with pytest.raises(SchemaError, match=r"captions.jsonl:2: .*img1.png"):
        read_chats(data, "Describe this image.", [], [], None)
    data = _write_captions(tmp_path, [CT_TWO, {**FUNDUS_NONE, "modality": "PET"}])
    with pytest.raises(SchemaError, match=r"captions.jsonl:2 \(cap1\): facts.modality 'PET'"):
        read_chats(data, "Describe this image.", [], [], None)
    data = _write_captions(tmp_path, [{k: v for k, v in CT_TWO.items() if k != "side"}])
    with pytest.raises(SchemaError, match=r"captions.jsonl:1 \(cap0\): .*need side"):
        read_chats(data, "Describe this image.", [], [], None)
    data = _write_captions(tmp_path, [None])
    with pytest.raises(SchemaError, match=r"captions.jsonl:1 \(cap0\): no 'facts'"):
        read_chats(data, "Describe this image.", [], [], None)
