"""VQA metrics as pure functions: LLaVA-Med-compatible and strict, one registry shared by eval and GRPO rewards.

    from medllava.metrics import METRICS, metrics_for, score, accuracy, extract_answer
    METRICS["llava_recall"]("The left lung.", "left lung")          # 1.0
    score("No, it is normal.", "no", "CLOSED")                      # {metric name: value} for that answer type
    accuracy("<answer>B</answer>", "B", "CHOICE")                   # 1.0: the default reward per answer type

Every registered metric is `fn(prediction, answer) -> float` in [0, 1]; the prediction first goes through
`extract_answer`, so `<think>...</think><answer>...</answer>` completions score on the answer alone.

LLaVA-Med-compatible (`llava_*`) follow LLaVA-Med v1.0's `llava/eval/run_eval*.py` and `eval_metrics/`
(https://github.com/microsoft/LLaVA-Med, branch v1.0.0), including their quirks, so that their numbers can be reproduced:
- normalisation (`llava_normalize`): lowercase; a fixed list of punctuation characters is deleted when the text
  has it next to a space (or has a digit,digit comma) and replaced by a space otherwise (":" and "'" are not in
  the list and stay); periods not followed by a digit are deleted (at most 32, the `count` their call passes by
  accident); number words "none"/"zero".."ten" -> digits; a/an/the dropped; apostrophe-less contractions get
  their apostrophes back ("dont" -> "don't").
- closed "yes/no accuracy": the normalised answer is a character substring of the normalised prediction
  (lenient: "no" matches inside "abnormal", "not", "nodule"). `llava_closed_accuracy_yn` also requires "yes"
  or "no" (as substrings) in the prediction, as `run_eval.py` does (that script moreover leaves such misses out
  of its denominator, a bug its batch version fixes; we always count every question).
- open "recall" (the paper's number), precision and F1 over whitespace tokens: tp = summed prediction counts
  of words in both, fp = prediction counts of words only in the prediction, fn = answer counts of words
  missing from the prediction; 0 when either side is empty or tp = 0.
- "exact match": unique answer words found in the prediction / number of prediction tokens.
- "open hit": the normalised answer is a substring of the normalised prediction (`run_eval_batch.py`).
- BLEU: NLTK `sentence_bleu` on the normalised whitespace tokens; `llava_bleu` is the default cumulative
  4-gram BLEU, `llava_bleu1/2/3` use weights (1,0,0,0), (0,1,0,0), (0,0,1,0) (single n-gram orders).

Strict (`strict_*`): closed is correct only when exactly one of yes/no appears as a word and it matches;
open is normalised exact match and SQuAD-style token F1; multiple choice compares the option letter.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable

from medllava.prompts import extract_answer, extract_choice
from medllava.schema import infer_answer_type

# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Med normalisation
# ---------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
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
_ARTICLES = frozenset({"a", "an", "the"})
_LLAVA_PUNCT = ';/[]"{}()=+\\_->@<`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
# The canonical forms whose apostrophe-less spellings the VQA-style normaliser restores: every form with one of
# its apostrophes removed maps back to it ("dont" -> "don't", "couldnt've" -> "couldn't've").
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
    "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
    "you'd you'll you're you've couldn't've hadn't've he'd've it'd've mightn't've shouldn't've wouldn't've "
    "she'd've somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've you'd've y'all'll "
    "y'all'd've 'ow's'at"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED:
        for i, char in enumerate(form):
            if char == "'":
                table[form[:i] + form[i + 1 :]] = form
    table["somebody'd"] = "somebodyd"  # the one reversed entry of the original table, kept for compatibility
    return table


_CONTRACTIONS = _contraction_table()


def llava_normalize(text: str) -> str:
    """LLaVA-Med's answer normalisation (see the module docstring for the exact rules and quirks)."""
    original = str(text)
    out = original
    delete_all = _DIGIT_COMMA.search(original) is not None
    for p in _LLAVA_PUNCT:
        touches_space = (p + " ") in original or (" " + p) in original
        out = out.replace(p, "" if touches_space or delete_all else " ")
    out = _PERIOD.sub("", out, count=32)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _llava_once(text: str) -> str:
    """What LLaVA-Med's scripts compare for closed questions and BLEU: normalise(lowercase(text))."""
    return llava_normalize(str(text).lower())


def _llava_tokens(text: str) -> list[str]:
    """Tokens for their F1/precision/recall/exact match: the scripts normalise once more inside those functions."""
    return llava_normalize(_llava_once(text)).lower().split()


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Med-compatible metrics (prediction, answer) -> float
# ---------------------------------------------------------------------------------------------------------------


def llava_closed_accuracy(prediction: str, answer: str) -> float:
    return float(_llava_once(answer) in _llava_once(prediction))


def llava_closed_accuracy_yn(prediction: str, answer: str) -> float:
    pred = _llava_once(prediction)
    return float(("yes" in pred or "no" in pred) and _llava_once(answer) in pred)


def llava_open_hit(prediction: str, answer: str) -> float:
    return float(_llava_once(answer) in _llava_once(prediction))


def _llava_prf(prediction: str, answer: str) -> tuple[float, float, float]:
    pred, gold = Counter(_llava_tokens(prediction)), Counter(_llava_tokens(answer))
    if not pred or not gold:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in pred.items() if w in gold)
    fp = sum(n for w, n in pred.items() if w not in gold)
    fn = sum(n for w, n in gold.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def llava_precision(prediction: str, answer: str) -> float:
    return _llava_prf(prediction, answer)[0]


def llava_recall(prediction: str, answer: str) -> float:
    return _llava_prf(prediction, answer)[1]


def llava_f1(prediction: str, answer: str) -> float:
    return _llava_prf(prediction, answer)[2]


def llava_exact_match(prediction: str, answer: str) -> float:
    pred = _llava_tokens(prediction)
    if not pred:
        return 0.0
    return sum(1 for w in set(_llava_tokens(answer)) if w in pred) / len(pred)


def _bleu(weights: tuple[float, ...]) -> Callable[[str, str], float]:
    def bleu(prediction: str, answer: str) -> float:
        from nltk.translate.bleu_score import sentence_bleu

        with warnings.catch_warnings():  # NLTK warns on every zero n-gram count; the score is still defined
            warnings.simplefilter("ignore")
            return float(
                sentence_bleu([_llava_once(answer).split()], _llava_once(prediction).split(), weights=weights)
            )

    bleu.__name__ = f"llava_bleu_{'_'.join(str(w) for w in weights)}"
    return bleu


llava_bleu = _bleu((0.25, 0.25, 0.25, 0.25))
llava_bleu1 = _bleu((1, 0, 0, 0))
llava_bleu2 = _bleu((0, 1, 0, 0))
llava_bleu3 = _bleu((0, 0, 1, 0))

# ---------------------------------------------------------------------------------------------------------------
# Strict metrics
# ---------------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:\.\d+)*")  # letters/digits runs; keeps decimals such as 1.5
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000 -> 1000


def normalize(text: str) -> str:
    """Strict normalisation: lowercase, thousands commas and apostrophes dropped, all other punctuation a
    separator (decimal points kept), number words -> digits, articles dropped, single spaces."""
    text = _THOUSANDS.sub("", str(text).lower()).replace("'", "").replace("\u2019", "")
    words = _WORD.findall(text)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def strict_exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def strict_closed_accuracy(prediction: str, answer: str) -> float:
    """Correct only if exactly one of yes/no appears (as a word) and it is the answer; a closed answer that is
    not yes/no ("left" for "left or right?") needs a normalised exact match."""
    gold = normalize(answer)
    if gold not in ("yes", "no"):
        return strict_exact_match(prediction, answer)
    said = {w for w in normalize(prediction).split() if w in ("yes", "no")}
    return float(said == {gold})


def strict_token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style token F1 on strictly normalised words (1.0 when both are empty)."""
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def strict_choice_accuracy(prediction: str, answer: str) -> float:
    """Option letters equal; a ground truth without a letter falls back to normalised exact match."""
    gold = extract_choice(answer)
    if gold is None:
        return strict_exact_match(prediction, answer)
    return float(extract_choice(prediction) == gold)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def _on_answer(fn: Callable[[str, str], float]) -> Callable[[str, str], float]:
    def metric(prediction: str, answer: str) -> float:
        return fn(extract_answer(prediction), str(answer))

    metric.__name__, metric.__doc__ = fn.__name__, fn.__doc__
    return metric


_RAW = {
    "llava_closed_accuracy": llava_closed_accuracy,
    "llava_closed_accuracy_yn": llava_closed_accuracy_yn,
    "llava_recall": llava_recall,
    "llava_precision": llava_precision,
    "llava_f1": llava_f1,
    "llava_exact_match": llava_exact_match,
    "llava_open_hit": llava_open_hit,
    "llava_bleu": llava_bleu,
    "llava_bleu1": llava_bleu1,
    "llava_bleu2": llava_bleu2,
    "llava_bleu3": llava_bleu3,
    "strict_closed_accuracy": strict_closed_accuracy,
    "strict_exact_match": strict_exact_match,
    "strict_token_f1": strict_token_f1,
    "strict_choice_accuracy": strict_choice_accuracy,
}
METRICS: dict[str, Callable[[str, str], float]] = {name: _on_answer(fn) for name, fn in _RAW.items()}

LABELS = {
    "llava_closed_accuracy": "LLaVA-Med yes/no accuracy (substring)",
    "llava_closed_accuracy_yn": "LLaVA-Med yes/no accuracy (run_eval.py: needs yes/no)",
    "llava_recall": "LLaVA-Med open recall (paper)",
    "llava_precision": "LLaVA-Med open precision",
    "llava_f1": "LLaVA-Med open F1",
    "llava_exact_match": "LLaVA-Med 'exact match' (precision-like)",
    "llava_open_hit": "LLaVA-Med open hit (substring)",
    "llava_bleu": "LLaVA-Med BLEU (cumulative 4-gram)",
    "llava_bleu1": "LLaVA-Med BLEU-1",
    "llava_bleu2": "LLaVA-Med BLEU-2 (2-gram only)",
    "llava_bleu3": "LLaVA-Med BLEU-3 (3-gram only)",
    "strict_closed_accuracy": "strict yes/no accuracy (exactly one of yes/no)",
    "strict_exact_match": "strict exact match",
    "strict_token_f1": "strict token F1",
    "strict_choice_accuracy": "strict choice letter accuracy",
}

# Which metrics apply to which answer type (the schema's answer_type).
ANSWER_TYPE_METRICS: dict[str, tuple[str, ...]] = {
    "CLOSED": ("llava_closed_accuracy", "llava_closed_accuracy_yn", "strict_closed_accuracy"),
    "OPEN": (
        "llava_recall",
        "llava_precision",
        "llava_f1",
        "llava_exact_match",
        "llava_open_hit",
        "llava_bleu",
        "llava_bleu1",
        "llava_bleu2",
        "llava_bleu3",
        "strict_exact_match",
        "strict_token_f1",
    ),
    "CHOICE": ("strict_choice_accuracy", "strict_exact_match"),
}

# The accuracy reward per answer type (GRPO): strict, and graded for open answers (partial credit learns).
ACCURACY_METRIC = {
    "CLOSED": "strict_closed_accuracy",
    "OPEN": "strict_token_f1",
    "CHOICE": "strict_choice_accuracy",
}


def metrics_for(answer_type: str) -> tuple[str, ...]:
    if answer_type not in ANSWER_TYPE_METRICS:
        raise ValueError(
            f"unknown answer_type {answer_type!r} (expected one of {', '.join(ANSWER_TYPE_METRICS)})"
        )
    return ANSWER_TYPE_METRICS[answer_type]


def score(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """{metric name: value} for every metric that applies to `answer_type`."""
    return {name: METRICS[name](prediction, answer) for name in metrics_for(answer_type)}


def accuracy(prediction: str, answer: str, answer_type: str | None = None) -> float:
    """The default accuracy of one answer (the GRPO accuracy reward): see ACCURACY_METRIC."""
    return METRICS[ACCURACY_METRIC[answer_type or infer_answer_type(answer)]](prediction, answer)
