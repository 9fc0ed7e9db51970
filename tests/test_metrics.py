"""The metrics equal the LLaVA-Med v1.0 definitions (its run_eval scripts, written out again here in the plainest form)."""

from __future__ import annotations

import math
import re

import pytest

from medllava import metrics
from medllava.metrics import METRICS, extract_answer, extract_choice, llava_normalize

# ---------------------------------------------------------------------------------------------------------------
# The definitions, transcribed independently (plain loops, no shared helpers from medllava.metrics)
# ---------------------------------------------------------------------------------------------------------------

NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
SPECIAL = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
APOSTROPHE_FREE = {
    "dont": "don't",
    "isnt": "isn't",
    "cant": "can't",
    "whats": "what's",
    "theres": "there's",
    "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've",
    "twas": "'twas",
}


def ref_normalize(text):
    has_digit_comma = any(
        text[i - 1].isdigit() and text[i] == "," and text[i + 1].isdigit() for i in range(1, len(text) - 1)
    )
    out = text
    for ch in SPECIAL:
        if ch + " " in text or " " + ch in text or has_digit_comma:
            out = out.replace(ch, "")
        else:
            out = out.replace(ch, " ")
    kept, removed = [], 0
    for i, ch in enumerate(out):
        nxt = out[i + 1] if i + 1 < len(out) else ""
        if ch == "." and not nxt.isdigit() and removed < 32:
            removed += 1
            continue
        kept.append(ch)
    words = []
    for w in "".join(kept).lower().split():
        w = NUMBERS.get(w, w)
        if w in ("a", "an", "the"):
            continue
        words.append(APOSTROPHE_FREE.get(w, w))
    return " ".join(words)


def once(text):
    return ref_normalize(text.lower())


def twice(text):
    return ref_normalize(once(text)).lower().split()


def ref_closed(pred, gt):
    return 1.0 if once(gt) in once(pred) else 0.0


def ref_closed_yn(pred, gt):
    p = once(pred)
    return 1.0 if ("yes" in p or "no" in p) and once(gt) in p else 0.0


def ref_prf(pred, gt):
    p, g = twice(pred), twice(gt)
    if not p or not g:
        return 0.0, 0.0, 0.0
    tp = fp = fn = 0
    for w in set(p) | set(g):
        if w in p and w in g:
            tp += p.count(w)
        elif w in p:
            fp += p.count(w)
        else:
            fn += g.count(w)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def ref_exact(pred, gt):
    p, g = twice(pred), twice(gt)
    if not p:
        return 0.0
    return len([w for w in set(g) if w in p]) / len(p)


def ref_bleu(pred, gt, weights):
    """BLEU by hand: brevity penalty x geometric mean of clipped n-gram precisions (NLTK's zero-count rule)."""
    hyp, ref = once(pred).split(), once(gt).split()
    if not hyp:
        return 0.0
    logs = []
    for n, w in enumerate(weights, start=1):
        grams = [tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)]
        ref_grams = [tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)]
        matched = sum(min(grams.count(g), ref_grams.count(g)) for g in set(grams))
        if n == 1 and matched == 0:
            return 0.0
        p = matched / len(grams) if grams and matched else 2.2250738585072014e-308  # NLTK: sys.float_info.min
        logs.append(w * math.log(p))
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(sum(logs))


# Hand-written (prediction, answer) pairs, edge cases included.
CLOSED_PAIRS = [
    ("yes", "yes"),
    ("Yes.", "yes"),
    ("No", "yes"),
    ("no", "no"),
    ("The lesion is abnormal.", "no"),
    ("It is not there", "no"),
    ("nodule present", "no"),
    ("yes, there is no doubt", "yes"),
    ("YES, NO", "no"),
    ("", "yes"),
    ("Maybe", "no"),
    ("left", "left"),
    ("The left one", "left"),
    ("I can't tell", "yes"),
    ("none", "no"),
    ("yes!!", "yes"),
]
OPEN_PAIRS = [
    ("left lung", "left lung"),
    ("The left lung.", "left lung"),
    ("left left left", "left lung"),
    ("right", "left"),
    ("There are two nodules", "2"),
    ("2", "two"),
    ("", "liver"),
    ("liver", ""),
    ("the the a", "the"),
    ("MRI - T2 weighted", "t2 weighted"),
    ("x-ray", "x ray"),
    ("1,000 cells", "1000 cells"),
    ("fracture of the 3.5 cm bone.", "3.5 cm"),
    ("It dont matter", "don't"),
    ("brain, skull (axial)", "brain"),
    ("a b c d e", "a b c"),
    ("cyst cyst cyst cyst in kidney", "kidney cyst"),
    ("none", "zero"),
    ("Whats that? it's the heart!", "heart"),
    ("grade II glioma", "grade ii glioma"),
]


@pytest.mark.parametrize(
    "text",
    [p for pair in CLOSED_PAIRS + OPEN_PAIRS for p in pair]
    + ["a.b.c. " * 20, "1,2 and (3)", "x -y", "dont isnt couldnt've twas"],
)
def test_normalisation_matches_the_definition(text):
    assert llava_normalize(text.lower()) == ref_normalize(text.lower())


def test_normalisation_rules():
    assert llava_normalize("the two lesions") == "2 lesions"
    assert llava_normalize("None.") == "0"
    assert llava_normalize("an mri, done") == "mri done"
    assert llava_normalize("dont") == "don't"
    assert llava_normalize("3.5 cm") == "3.5 cm"
    assert llava_normalize("x-ray") == "x ray" and llava_normalize("1,000 x-ray") == "1000 xray"


@pytest.mark.parametrize("pred,gt", CLOSED_PAIRS)
def test_closed_accuracy_matches_llava_med(pred, gt):
    assert METRICS["llava_closed_accuracy"](pred, gt) == pytest.approx(ref_closed(pred, gt), abs=1e-6)
    assert METRICS["llava_closed_accuracy_yn"](pred, gt) == pytest.approx(ref_closed_yn(pred, gt), abs=1e-6)


@pytest.mark.parametrize("pred,gt", OPEN_PAIRS)
def test_open_metrics_match_llava_med(pred, gt):
    precision, recall, f1 = ref_prf(pred, gt)
    assert METRICS["llava_precision"](pred, gt) == pytest.approx(precision, abs=1e-6)
    assert METRICS["llava_recall"](pred, gt) == pytest.approx(recall, abs=1e-6)
    assert METRICS["llava_f1"](pred, gt) == pytest.approx(f1, abs=1e-6)
    assert METRICS["llava_exact_match"](pred, gt) == pytest.approx(ref_exact(pred, gt), abs=1e-6)
    assert METRICS["llava_open_hit"](pred, gt) == float(once(gt) in once(pred))
    for name, weights in [
        ("llava_bleu", (0.25,) * 4),
        ("llava_bleu1", (1, 0, 0, 0)),
        ("llava_bleu2", (0, 1, 0, 0)),
        ("llava_bleu3", (0, 0, 1, 0)),
    ]:
        assert METRICS[name](pred, gt) == pytest.approx(ref_bleu(pred, gt, weights), abs=1e-6), name


def test_known_values():
    # "no" inside "abnormal": a hit for LLaVA-Med, a miss for the strict metric
    assert METRICS["llava_closed_accuracy"]("The lesion is abnormal", "no") == 1.0
    assert METRICS["strict_closed_accuracy"]("The lesion is abnormal", "no") == 0.0
    # recall rewards long answers; their "exact match" is precision-like
    assert METRICS["llava_recall"]("left lung and right lung and heart", "left lung") == 1.0
    assert METRICS["llava_exact_match"]("left lung and right lung and heart", "left lung") == pytest.approx(
        2 / 7
    )
    assert METRICS["llava_recall"]("left left left", "left lung") == pytest.approx(3 / 4)
    assert METRICS["llava_bleu1"]("the left lung is", "left lung") == pytest.approx(2 / 3)


def test_strict_closed():
    cases = {
        ("Yes.", "yes"): 1,
        ("yes, no doubt", "yes"): 0,
        ("No", "yes"): 0,
        ("no no", "no"): 1,
        ("Not sure", "no"): 0,
        ("", "no"): 0,
        ("Left.", "left"): 1,
        ("left side", "left"): 0,
    }
    for (pred, gt), want in cases.items():
        assert METRICS["strict_closed_accuracy"](pred, gt) == want, (pred, gt)


def test_strict_open():
    assert METRICS["strict_exact_match"]("The Left lung.", "left lung") == 1.0
    assert METRICS["strict_exact_match"]("left lung lobe", "left lung") == 0.0
    assert METRICS["strict_exact_match"]("Two", "2") == 1.0
    assert METRICS["strict_token_f1"]("left upper lobe", "left lobe") == pytest.approx(
        2 * (2 / 3) * 1 / (2 / 3 + 1)
    )
    assert METRICS["strict_token_f1"]("", "") == 1.0 and METRICS["strict_token_f1"]("x", "") == 0.0


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("B. Pneumonia", "B"),
        ("B) Pneumonia", "B"),
        ("answer: b", "B"),
        ("The answer is (C).", "C"),
        ("<answer>D</answer>", "D"),
        ("<think>A or B?</think> <answer>B</answer>", "B"),
        ("a pneumonia", None),
        ("pneumonia", None),
        ("", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_choice_accuracy():
    assert METRICS["strict_choice_accuracy"]("(b)", "B") == 1.0
    assert METRICS["strict_choice_accuracy"]("Answer: C", "B. Pneumonia") == 0.0
    assert METRICS["strict_choice_accuracy"]("pneumonia", "B") == 0.0
    assert METRICS["strict_choice_accuracy"]("Pneumonia", "pneumonia") == 1.0  # no letter in the truth: text


def test_extract_answer_and_tags():
    assert extract_answer("<think>hmm</think><answer> Yes </answer>") == "Yes"
    assert extract_answer("no tags here ") == "no tags here"
    assert extract_answer("<ANSWER>\nleft\n</ANSWER>") == "left"
    assert extract_answer(None) == ""
    # every registered metric scores the tagged answer only
    assert METRICS["strict_closed_accuracy"]("<think>yes or no</think><answer>no</answer>", "no") == 1.0
    assert METRICS["llava_recall"]("<think>liver</think><answer>spleen</answer>", "liver") == 0.0


def test_registry_shape():
    assert set(metrics.ANSWER_TYPE_METRICS) == {"OPEN", "CLOSED", "CHOICE"}
    for answer_type, names in metrics.ANSWER_TYPE_METRICS.items():
        assert names and all(n in METRICS and n in metrics.LABELS for n in names)
        assert metrics.ACCURACY_METRIC[answer_type] in names
    for name, fn in METRICS.items():
        for pred, gt in CLOSED_PAIRS[:4] + OPEN_PAIRS[:6]:
            value = fn(pred, gt)
            assert isinstance(value, float) and 0.0 <= value <= 1.0, name
    assert metrics.score("No.", "no", "CLOSED") == {
        "llava_closed_accuracy": 1.0,
        "llava_closed_accuracy_yn": 1.0,
        "strict_closed_accuracy": 1.0,
    }
    with pytest.raises(ValueError, match="unknown answer_type"):
        metrics.metrics_for("FREE")


def test_accuracy_reward_defaults():
    assert metrics.accuracy("yes", "yes") == 1.0  # inferred CLOSED
    assert metrics.accuracy("B", "B") == 1.0  # inferred CHOICE
    assert metrics.accuracy("left upper lobe", "left lobe", "OPEN") == pytest.approx(0.8)
    assert metrics.infer_answer_type("Yes.") == "CLOSED" and metrics.infer_answer_type("liver") == "OPEN"


def test_no_model_or_network_needed():
    # nltk's sentence_bleu needs no corpora: scoring works with NLTK_DATA pointing nowhere
    import os
    import subprocess
    import sys

    code = "from medllava.metrics import METRICS; print(METRICS['llava_bleu1']('left lung', 'left lung'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NLTK_DATA": "/nonexistent"},
    )
    assert re.fullmatch(r"1\.0\s*", out.stdout)
