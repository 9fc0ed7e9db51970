"""medllava.prompts: the one home of answer instructions, the answer format and answer extraction."""

import pytest

from medllava import metrics
from medllava.prompts import (
    ANSWER_SUFFIXES,
    add_answer_suffix,
    extract_answer,
    is_answer_format,
    stated_answer,
    with_prefix,
    with_suffix,
)
from medllava.schema import message


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>round, bright</think><answer> Yes </answer>", "Yes"),
        ("This is an MRI of the head. No.", "No"),
        ("There is no lesion in the left lung. no", "no"),
        ("A lesion is present! Yes", "Yes"),
        ("No.", "No."),  # a bare verdict stays as it is
        ("No, there is a mass.", "No, there is a mass."),  # verdict first: not a stated-finding answer
        ("left upper lobe", "left upper lobe"),
        ("It is not known", "It is not known"),
        (None, ""),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_stated_answers_score_on_their_verdict():
    reply = stated_answer("There is no lesion in this CT of the chest", "no")
    assert reply == "There is no lesion in this CT of the chest. No."
    # the statement has its own "no": only the verdict is scored, by the strict and the LLaVA-Med metric alike
    assert metrics.METRICS["strict_closed_accuracy"](reply, "no") == 1.0
    assert metrics.METRICS["strict_closed_accuracy"](reply, "yes") == 0.0
    assert metrics.METRICS["llava_closed_accuracy"](stated_answer("A lesion is seen", "yes"), "no") == 0.0
    with pytest.raises(ValueError, match="verdict is yes or no"):
        stated_answer("This is a CT", "maybe")


def test_suffix_and_prefix_edit_only_the_last_user_turn_and_copy():
    messages = [
        message("user", "Which organ?", 1),
        message("assistant", "liver"),
        message("user", "Is it big?"),
    ]
    asked = with_suffix(messages, ANSWER_SUFFIXES["CLOSED"])
    assert asked[-1]["content"][-1]["text"] == "Is it big? Answer yes or no."
    assert asked[0] == messages[0] and messages[-1]["content"][-1]["text"] == "Is it big?"
    assert with_prefix(messages, "This is a CT.")[-1]["content"][-1]["text"] == "This is a CT. Is it big?"
    row = {"messages": messages, "answer_types": ["OPEN", "CLOSED"]}
    users = [m for m in add_answer_suffix(row)["messages"] if m["role"] == "user"]
    assert [u["content"][-1]["text"] for u in users] == [
        "Which organ? Answer with a short phrase.",
        "Is it big? Answer yes or no.",
    ]


def test_answer_format():
    assert is_answer_format("<think>a</think> <answer>b</answer>")
    assert is_answer_format("<answer>b</answer>\n")
    assert not is_answer_format("b <answer>b</answer>")


def test_split_stated():
    from medllava.prompts import split_stated

    assert split_stated("There is no lesion. No.") == ("There is no lesion", "No")
    assert split_stated("no") is None and split_stated("left lung") is None
    assert split_stated("<answer>There is a lesion. Yes.</answer>") is None
