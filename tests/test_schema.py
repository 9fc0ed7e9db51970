"""The schema in code: builders, accessors, validation reasons, JSONL I/O."""

from __future__ import annotations

import json

import pytest
from conftest import random_image

from medllava.schema import (
    CHOICE,
    CLOSED,
    OPEN,
    SchemaError,
    conversation,
    infer_answer_type,
    make_vqa_row,
    message,
    normalise_answer_type,
    prompt_messages,
    read_jsonl,
    validate_row,
    validate_structure,
    vqa_answer,
    vqa_question,
    write_jsonl,
)


def vqa(**overrides):
    row = make_vqa_row("t-1", ["a.png"], "Is there a mass?", "yes", CLOSED, source="test", modality=None)
    row.update(overrides)
    return row


def test_make_vqa_row_and_accessors():
    row = vqa()
    assert row["messages"][0]["content"][0] == {"type": "image"}
    assert "modality" not in row  # None metadata left out
    assert vqa_question(row) == "Is there a mass?"
    assert vqa_answer(row) == "yes"
    assert prompt_messages(row) == row["messages"][:1]
    assert validate_structure(row) == []


def test_multi_turn_accessors_use_last_turns():
    row = {
        "id": "m",
        "images": ["a.png"],
        "messages": conversation([("What scan?", "A CT."), ("Which side?", "Left.")], system="Be brief."),
    }
    assert validate_structure(row) == []
    assert vqa_question(row) == "Which side?"
    assert vqa_answer(row) == "Left."
    grpo = {"id": "g", "images": [], "prompt": [message("user", "Yes or no?")], "solution": "no"}
    assert vqa_answer(grpo) == "no" and vqa_question(grpo) == "Yes or no?"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: r.update(images=[]), "1 image placeholder(s) in the messages but 0 image(s)"),
        (lambda r: r["messages"].append(message("user", "and?")), "ends with a 'user' turn"),
        (lambda r: r["messages"].insert(1, message("user", "again")), "roles must alternate"),
        (lambda r: r["messages"][1]["content"][0].update(text="  "), "empty assistant turn"),
        (lambda r: r.update(answer_type="closed"), "answer_type"),
        (lambda r: r.pop("id"), "id: missing"),
        (lambda r: r["messages"][0]["content"][1].update(text="<image> what?"), "literal <image>"),
        (
            lambda r: r["messages"][1]["content"].insert(0, {"type": "image"}),
            "image placeholder in a assistant",
        ),
        (lambda r: r["messages"][0].update(role="doctor"), "unknown role"),
        (lambda r: r["messages"][0]["content"].append({"type": "video"}), "unknown part type"),
        (lambda r: r.update(messages=[]), "non-empty list"),
        (lambda r: r["messages"][0]["content"][1].update(text="hi<|im_end|>"), "control token '<|im_end|>'"),
        (lambda r: r["messages"][1].update(content="yes <|endoftext|>"), "control token '<|endoftext|>'"),
        (lambda r: r["messages"][0]["content"][1].update(text="a \ud800 b"), "does not encode as UTF-8"),
        (lambda r: r.update(source="\udfff"), "source: text does not encode as UTF-8"),
        (lambda r: r.update(images=["a" * 300 + ".png"]), "images[0]: path too long"),
        (lambda r: r.update(images=["a\x00.png"]), "images[0]: path contains a NUL character"),
        (lambda r: r.update(extra=json.loads("[" * 40 + "]" * 40)), "nested deeper than 32 levels"),
    ],
)
def test_structure_rejects_injected_defects(mutate, reason):
    row = vqa()
    mutate(row)
    problems = validate_structure(row)
    assert any(reason in p for p in problems), problems


def test_grpo_and_dpo_rows():
    prompt = [message("user", "Is there a mass?", 1)]
    assert validate_structure({"id": "g", "images": ["a.png"], "prompt": prompt, "solution": "yes"}) == []
    assert "solution" in validate_structure({"id": "g", "images": ["a.png"], "prompt": prompt})[0]
    dpo = {
        "id": "d",
        "images": ["a.png"],
        "prompt": prompt,
        "chosen": [message("assistant", "yes")],
        "rejected": [message("assistant", "no")],
    }
    assert validate_structure(dpo) == []
    dpo["rejected"] = [message("assistant", "yes")]
    assert "chosen and rejected are identical" in validate_structure(dpo)


def test_validate_row_checks_images_on_disk(tmp_path):
    random_image().save(tmp_path / "a.png")
    assert validate_row(vqa(), tmp_path) == []
    (tmp_path / "a.png").write_bytes(b"not an image at all")
    assert any("does not decode" in p for p in validate_row(vqa(), tmp_path))
    assert any("image not found" in p for p in validate_row(vqa(images=["b.png"]), tmp_path))
    assert validate_row(vqa(images=["b.png"]), tmp_path, check_images=False) == []


def test_validate_row_token_limit(tmp_path, tiny):
    _, processor = tiny
    random_image().save(tmp_path / "a.png")
    assert validate_row(vqa(), tmp_path, processor=processor, max_tokens=4096) == []
    problems = validate_row(vqa(), tmp_path, processor=processor, max_tokens=5)
    assert len(problems) == 1 and "tokens > max 5" in problems[0]


def test_answer_types():
    assert infer_answer_type("Yes.") == CLOSED and infer_answer_type("left lung") == OPEN
    # one answer-type rule for data, eval and rewards: a bare option letter is a choice answer
    assert (
        infer_answer_type("B") == CHOICE
        and infer_answer_type("(c)") == CHOICE
        and infer_answer_type("D.") == CHOICE
    )
    assert infer_answer_type("(no)") == CLOSED and infer_answer_type("hepatitis B") == OPEN
    from medllava import metrics, rewards

    assert metrics.infer_answer_type is infer_answer_type
    assert rewards.infer_answer_type is infer_answer_type
    assert normalise_answer_type(" closed ") == CLOSED
    assert normalise_answer_type("Open-ended") == OPEN
    assert normalise_answer_type("banana") is None


def test_jsonl_round_trip_and_line_numbers(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl(path, [vqa(), vqa(id="t-2")]) == 2
    assert [n for n, _ in read_jsonl(path)] == [1, 2]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text(json.dumps(vqa()) + "\n\n{broken\n")
    with pytest.raises(SchemaError, match=r"rows.jsonl:3: malformed JSON"):
        list(read_jsonl(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(SchemaError, match=r":1: expected a JSON object"):
        list(read_jsonl(path))


def test_write_jsonl_keeps_old_file_when_interrupted(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [vqa()])

    def rows():
        yield vqa(id="new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, rows())
    assert [r["id"] for _, r in read_jsonl(path)] == ["t-1"]
    assert len(list(tmp_path.iterdir())) == 1
