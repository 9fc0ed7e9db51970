"""GRPO rewards are pure functions over TRL's reward signature, built on the eval metrics (one implementation)."""

import pytest

from medllava import metrics
from medllava.rewards import FORMAT_SYSTEM_PROMPT, REWARD_FUNCS, completion_text, get_reward_funcs


def conv(text):
    return [{"role": "assistant", "content": text}]


def call(name, texts, solutions, types=None):
    kwargs = {"solution": solutions}
    if types is not None:
        kwargs["answer_type"] = types
    return REWARD_FUNCS[name]([[]] * len(texts), [conv(t) for t in texts], **kwargs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>yes</answer>", 1.0),
        ("<think>a dark spot on the left</think>\n<answer>yes</answer>", 1.0),
        ("  <answer>left lung</answer>\n", 1.0),
        ("yes", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>yes</answer> and more text", 0.0),
        ("<think>only thinking</think>", 0.0),
        ("<answer>yes</answer><think>late</think>", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert call("format", [text], ["yes"]) == [expected]


def test_closed_accuracy_is_exact_yes_no():
    texts = ["<answer>Yes.</answer>", "yes, there is", "no", "yes or no", "abnormal", "<answer>no</answer>"]
    assert call("accuracy", texts, ["yes"] * 6, ["CLOSED"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_open_accuracy_gives_partial_credit():
    got = call(
        "accuracy",
        ["<answer>The left lung</answer>", "left upper lobe", "heart"],
        ["left lung"] * 3,
        ["OPEN"] * 3,
    )
    assert got[0] == 1.0 and 0.0 < got[1] < 1.0 and got[2] == 0.0
    assert call("open_exact", ["left  lung.", "left upper lung"], ["Left lung"] * 2, ["OPEN"] * 2) == [
        1.0,
        0.0,
    ]


def test_choice_letter():
    assert call(
        "choice", ["<answer>(B)</answer>", "B. Pneumonia", "answer: c"], ["B"] * 3, ["CHOICE"] * 3
    ) == [1.0, 1.0, 0.0]


def test_typed_rewards_skip_other_answer_types():
    got = call("open_f1", ["yes", "left lung"], ["yes", "left lung"], ["CLOSED", "OPEN"])
    assert got == [None, 1.0]
    assert call("closed_accuracy", ["yes", "x"], ["yes", "left lung"]) == [1.0, None]  # type inferred


def test_rewards_are_the_eval_metrics():
    """One implementation: the accuracy reward equals medllava.metrics.accuracy on every case."""
    cases = [
        ("<answer>no</answer>", "no", "CLOSED"),
        ("a nodule", "small nodule", "OPEN"),
        ("(a)", "A", "CHOICE"),
    ]
    for text, solution, answer_type in cases:
        assert call("accuracy", [text], [solution], [answer_type]) == [
            metrics.accuracy(text, solution, answer_type)
        ]


def test_plain_string_completions_and_names():
    assert completion_text("<answer>x</answer>") == "<answer>x</answer>"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    funcs = get_reward_funcs(["format", "accuracy"])
    assert [f.__name__ for f in funcs] == ["format", "accuracy"]
    assert funcs[0]([[]], ["<answer>a</answer>"]) == [1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_funcs(["nope"])
    assert "<answer>" in FORMAT_SYSTEM_PROMPT


def test_stated_format_pays_for_the_answer_form_the_sft_stages_teach():
    from medllava.rewards import REWARD_FUNCS, has_stated_form

    completions = [
        "This is an MRI of the head. No.",  # closed: statement, then the verdict
        "No.",  # closed without its statement
        "This is an MRI of the head.",  # closed without a verdict
        "left",  # open: a short phrase
        "The lesion is in the left half of the image, near the top edge of it.",  # open: too long
        "Yes.",  # open answered with a verdict
        "B",  # choice: a letter
    ]
    types = ["CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN", "CHOICE"]
    solutions = ["no", "no", "no", "left", "left", "left", "B"]
    rewards = REWARD_FUNCS["stated_format"](None, completions, solution=solutions, answer_type=types)
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    # the answer type is inferred from the solution when a row has none
    assert REWARD_FUNCS["stated_format"](None, ["There is no lesion. No."], solution=["no"]) == [1.0]
    assert not has_stated_form("  ", "OPEN")
