"""The scoring protocols of the medical VQA harnesses, as pure functions: the same predictions, each harness's rules.

    from eval.protocols import PROTOCOLS, score_protocol, split_values
    row = {"id": "q1", "prediction": "Yes, there is.", "answer": "yes", "answer_type": "CLOSED"}
    PROTOCOLS["medevalkit"].score(row, "vqa_rad")      # Scored(group='closed', value=1.0, overall=1.0, note=None)
    scores = score_protocol(PROTOCOLS["lmms_eval"], [row], "slake")   # {id: Scored}
    split_values(scores)                               # per-question values behind closed / open / overall

Published numbers cannot be compared across papers because each harness normalises, matches and aggregates
differently ("yes" anywhere in the answer, exactly one of yes/no, exact match after its own normalisation,
tokenized F1). Each protocol below reproduces one harness's code (the file it mirrors is linked), quirks
included, so a prediction file can be scored the way a paper's table was:

- `ours`: this project's strict metrics (`medllava.metrics`, ACCURACY_METRIC per answer type).
- `llava_med`: LLaVA-Med v1.0 `llava/eval/run_eval.py` (closed: gold yes/no as a substring when "yes" or "no"
  occurs; open: their token recall, the paper's number).
- `medevalkit`: MedEvalKit (Lingshu, Hulu-Med) `utils/utils.py` + `utils/<DATASET>/<DATASET>.py`, rule path
  (no LLM judge): closed needs exactly one of "yes"/"no" as substrings; open is exact match after their parsing.
- `lmms_eval`: lmms-eval `lmms_eval/tasks/slake/utils.py` (the only medical VQA task on its main branch):
  exact match after its normalisation.
- `vlmevalkit`: VLMEvalKit scores PathVQA (its only one of these sets) with an LLM judge only; this protocol
  takes judge verdicts (`eval.judge`) and aggregates them VLMEvalKit's way. Without verdicts it scores nothing.
- `medgemma`: MedGemma's "tokenized F1" over all questions and accuracy on the closed subset. Google has not
  published that scoring code; the SQuAD definition of token F1 is used (see docs/eval.md).

Every `score(row, dataset)` returns a `Scored`: the harness's own closed/open group of the question (None when the
harness does not score it), the per-question value of the harness's headline metric for that group, and the
question's contribution to the harness's overall number (None when the harness reports no overall). `dataset`
(vqa_rad, slake, pathvqa, pmc_vqa or anything else) picks the per-dataset variant where a harness has one.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from medllava.metrics import (
    ACCURACY_METRIC,
    METRICS,
    infer_answer_type,
    llava_closed_accuracy_yn,
    llava_recall,
)

CLOSED, OPEN = "closed", "open"


@dataclass(frozen=True)
class Scored:
    group: str | None  # the harness's own split: "closed", "open", or None (counted in neither)
    value: float | None  # the harness's per-question number for its group's headline metric
    overall: float | None  # the contribution to the harness's overall number (None: no overall / not scored)
    note: str | None = None  # something that needed attention (counted in the report), e.g. a harness crash


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    mirrors: tuple[str, ...]  # links to the files whose rules are reproduced
    closed_metric: str
    open_metric: str
    overall_metric: str | None  # None: the harness reports no overall number
    score: Callable[[dict, str], Scored]
    needs_judge: bool = False


def _answer_type(row: dict) -> str:
    answer_type = row.get("answer_type")
    return (
        answer_type if answer_type in ("CLOSED", "OPEN", "CHOICE") else infer_answer_type(str(row["answer"]))
    )


def _text(value) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------------------
# ours: medllava.metrics (strict)
# ---------------------------------------------------------------------------------------------------------------


def score_ours(row: dict, dataset: str = "") -> Scored:
    """Strict: exactly one of yes/no for CLOSED, token F1 for OPEN, the option letter for CHOICE (as closed)."""
    answer_type = _answer_type(row)
    value = METRICS[ACCURACY_METRIC[answer_type]](_text(row.get("prediction")), _text(row["answer"]))
    return Scored(OPEN if answer_type == "OPEN" else CLOSED, value, value)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Med v1.0: llava/eval/run_eval.py (tag v1.0.0), normalisation from llava/eval/eval_metrics/glossary.py
# ---------------------------------------------------------------------------------------------------------------


def score_llava_med(row: dict, dataset: str = "") -> Scored:
    """CLOSED: "yes" or "no" somewhere in the normalised prediction and the normalised answer a substring of it;
    OPEN: their token recall. No <answer> extraction, no overall number, CHOICE rows are not scored."""
    answer_type = _answer_type(row)
    prediction, answer = _text(row.get("prediction")), _text(row["answer"])
    if answer_type == "CLOSED":
        return Scored(CLOSED, llava_closed_accuracy_yn(prediction, answer), None)
    if answer_type == "OPEN":
        return Scored(OPEN, llava_recall(prediction, answer), None)
    return Scored(None, None, None, "CHOICE question: not scored by LLaVA-Med")


# ---------------------------------------------------------------------------------------------------------------
# MedEvalKit: utils/utils.py, utils/VQA_RAD/VQA_RAD.py (= PATH_VQA), utils/SLAKE/SLAKE.py, utils/PMC_VQA/PMC_VQA.py,
# and mathruler.grader.extract_boxed_content (mathruler 0.1.0), which they import.
# ---------------------------------------------------------------------------------------------------------------

_MEK_ANSWER_PATTERNS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)


def boxed_content(text: str) -> str:
    r"""mathruler's extract_boxed_content: the text inside the last \boxed{...} (braces balanced), stripped, or
    the string "None" when there is none."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content = text[start + len("\\boxed{") :]
    depth = 0
    for i, char in enumerate(content):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == -1:
            return content[:i].strip()
    return "None"


def _tag_content(text: str, tag: str) -> str:
    """MedEvalKit's extract(text, tag): every <tag>...</tag> joined by spaces, or the whole text if none."""
    if not text:
        return ""
    start_tag, end_tag = f"<{tag}>", f"</{tag}>"
    found = ""
    start = text.find(start_tag)
    while start != -1:
        end = text.find(end_tag, start + len(start_tag))
        if end == -1:
            break
        found += text[start + len(start_tag) : end] + " "
        start = text.find(start_tag, end + len(end_tag))
    return found.strip() or text


def mek_parse_response(response: str) -> str:
    """MedEvalKit's parse_response: lowercase; a \\boxed{} (or, failing the word "boxed", an <answer> tag) taken;
    then the text after the last occurrence of each answer pattern in turn ("answer:", "answer is", ...). Not
    stripped afterwards: "answer: left" becomes " left". Any text containing the word "boxed" without a
    \\boxed{...} becomes "None"."""
    response = response.lower()
    if "boxed" in response:
        response = boxed_content(response)
    elif "<answer>" in response:
        response = _tag_content(response, "answer")
    for pattern in _MEK_ANSWER_PATTERNS:
        if pattern in response:
            response = response.split(pattern)[-1]
    return response


def mek_judge_judgement(answer: str, response: str) -> bool:
    """Yes/no: after parsing and deleting newlines and periods, exactly one of "yes"/"no" occurs as a substring
    (so "not", "none", "abnormal", "unknown" count as "no") and the answer is a substring of the response."""
    answer = answer.lower()
    response = mek_parse_response(response).replace("\n", "").replace(".", "")
    return bool((("yes" in response) ^ ("no" in response)) and answer in response)


def mek_judge_close_end(answer: str, response: str) -> bool:
    """SLAKE's closed questions whose answer is not literally "yes"/"no": exact match after parsing and
    deleting newlines and periods."""
    return mek_parse_response(response).replace("\n", "").replace(".", "") == answer.lower()


def mek_open_exact(answer: str, response: str) -> tuple[bool, str | None]:
    """judge_open_end_vqa's "em" (their open "acc"), and a note when their F1 step would raise: calculate_f1
    returns a bare 0 for a response without tokens, which the caller unpacks into three names."""
    parsed = mek_parse_response(response)
    note = (
        "empty open response: MedEvalKit's calculate_f1 would raise (TypeError)"
        if not parsed.split()
        else None
    )
    return parsed == answer.lower(), note


def mek_judge_multi_choice(choices: list[str], answer: str, response: str) -> bool:
    """MedEvalKit's judge_multi_choice (PMC-VQA): a bare letter, the option text, or else the option whose text
    is most similar (difflib ratio) to the whole response."""
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    if response.split("\n\n")[0] in letters:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in letters:
        response = response.split("\n\n")[-1].split(".")[0]
    response = mek_parse_response(response)
    options = [c.lower() for c in choices]
    response = response.strip().lower().replace("\n", "")
    split_response = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if split_response == answer:
        return True
    if split_response in letters:
        return options[ord(split_response) - ord("a")] == answer
    if split_response in options:
        return answer in letters and split_response == options[ord(answer) - ord("a")]
    best, best_ratio = 0, 0.0
    for i, option in enumerate(options):
        ratio = difflib.SequenceMatcher(None, option, response).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return letters[best] == answer or options[best] == answer


def _mek_preextract(response: str) -> str:
    """What cal_metrics does to every response first: a \\boxed{} (case-sensitive) or the <answer> tags."""
    boxed = boxed_content(response)
    if boxed != "None":
        return boxed
    if "<answer>" in response:
        return _tag_content(response, "answer")
    return response


def score_medevalkit(row: dict, dataset: str = "") -> Scored:
    """MedEvalKit's rule path (use_llm_judge off); per-dataset variant:
    - slake: the dataset's answer_type splits closed/open; closed answers literally "yes"/"no" (case-sensitive)
      use the yes/no judgement, other closed answers exact match; open answers exact match; nothing stripped;
    - pmc_vqa (and any CHOICE row with `choices`): judge_multi_choice;
    - vqa_rad, pathvqa and every other set: the gold answer decides: "yes"/"no" (lowercased, stripped) is
      closed, anything else open (a closed question answered "left" is scored as open).
    Overall = right / total over every scored question."""
    prediction, answer = _text(row.get("prediction")), _text(row["answer"])
    answer_type = _answer_type(row)
    if dataset == "pmc_vqa" or answer_type == "CHOICE":
        choices = row.get("choices")
        if not choices:
            return Scored(None, None, None, "CHOICE question without `choices`: not scored")
        value = float(mek_judge_multi_choice([str(c) for c in choices], answer, prediction))
        return Scored(CLOSED, value, value)
    response = _mek_preextract(prediction)
    if dataset == "slake":
        if answer_type == "OPEN":
            correct, note = mek_open_exact(answer, response)
            return Scored(OPEN, float(correct), float(correct), note)
        if answer in ("yes", "no"):
            correct = mek_judge_judgement(answer, response)
        else:
            correct = mek_judge_close_end(answer, response)
        return Scored(CLOSED, float(correct), float(correct))
    answer, response = answer.lower().strip(), response.lower().strip()
    if answer in ("yes", "no"):
        correct = float(mek_judge_judgement(answer, response))
        return Scored(CLOSED, correct, correct)
    correct, note = mek_open_exact(answer, response)
    return Scored(OPEN, float(correct), float(correct), note)


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval: lmms_eval/tasks/slake/utils.py (slake_process_results, normalize_answer, aggregation)
# ---------------------------------------------------------------------------------------------------------------

_LMMS_EN_YES = frozenset({"yes", "yeah", "yep", "true"})
_LMMS_EN_NO = frozenset({"no", "nope", "false"})
_LMMS_ZH_YES = frozenset({"是", "是的", "有", "包含", "可以", "能", "会", "正常"})
_LMMS_ZH_NO = frozenset({"否", "不是", "没有", "无", "不包含", "不能", "不会", "不可以", "不正常", "异常"})
_LMMS_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）"
)
_LMMS_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation + _LMMS_ZH_PUNCTUATION})
_LMMS_PARENS = re.compile(r"\([^)]*\)")
_LMMS_ZH_PARENS = re.compile(r"（[^）]*）")
_SPACES = re.compile(r"\s+")


def lmms_normalize(answer) -> str:
    """lmms-eval's SLAKE normalize_answer: strip, lowercase, drop (...) groups, punctuation -> spaces, collapse
    spaces, "x ray"/"xray" -> "xray", then a whole answer that is a yes/no synonym -> "yes"/"no"."""
    text = "" if answer is None else str(answer)
    text = text.strip().lower()
    text = _LMMS_PARENS.sub(" ", text)
    text = _LMMS_ZH_PARENS.sub(" ", text)
    text = _SPACES.sub(" ", text.translate(_LMMS_PUNCT_TABLE)).strip()
    if text in ("x ray", "xray"):
        text = "xray"
    if text in _LMMS_EN_YES or text in _LMMS_ZH_YES:
        return "yes"
    if text in _LMMS_EN_NO or text in _LMMS_ZH_NO:
        return "no"
    return text


def score_lmms_eval(row: dict, dataset: str = "") -> Scored:
    """Exact match after lmms_normalize, every question; slake_open/closed_accuracy split by the row's
    answer_type (lowercased), overall (slake_accuracy) over all questions, CHOICE ones included."""
    correct = float(lmms_normalize(row.get("prediction")) == lmms_normalize(row["answer"]))
    group = {"open": OPEN, "closed": CLOSED}.get(str(row.get("answer_type") or "").strip().lower())
    return Scored(group, correct, correct)


# ---------------------------------------------------------------------------------------------------------------
# VLMEvalKit: vlmeval/dataset/image_shortqa.py (ImageShortQADataset.evaluate, ShortQA_auxeval) and
# vlmeval/dataset/utils/multiple_choice.py (report_acc). Judge-only: needs verdicts.
# ---------------------------------------------------------------------------------------------------------------


def vlmevalkit_correctness(judge_output: str) -> int | None:
    """ShortQA_auxeval's extraction: the text between [Begin Correctness] and [End Correctness], lowercased; 1 if
    only "yes" occurs in it, 0 if only "no" does, None (ask again) otherwise or when the markers are missing."""
    start, end = "[Begin Correctness]", "[End Correctness]"
    if start not in judge_output or end not in judge_output:
        return None
    correct = judge_output.split(start)[1].split(end)[0].strip().lower()
    if ("yes" in correct) ^ ("no" in correct):
        return 1 if "yes" in correct else 0
    return None


def score_vlmevalkit(row: dict, dataset: str = "") -> Scored:
    """The judge's hit (0/1; 0 after three unparseable tries, VLMEvalKit's "Fail to Judge") for every question;
    Overall = mean hit. closed/open are our split of the same hits (VLMEvalKit reports none)."""
    hit = row.get("judge_hit")
    if hit is None:
        return Scored(
            None, None, None, "no judge verdict (VLMEvalKit scores these sets only with an LLM judge)"
        )
    answer_type = _answer_type(row)
    return Scored(OPEN if answer_type == "OPEN" else CLOSED, float(hit), float(hit))


# ---------------------------------------------------------------------------------------------------------------
# MedGemma: "tokenized F1" (all questions) and accuracy on the closed subset. Their code is not public; the
# SQuAD v1.1 evaluation script's normalisation and token F1 are used.
# ---------------------------------------------------------------------------------------------------------------

_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SQUAD_PUNCT = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in str(text).lower() if ch not in _SQUAD_PUNCT)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def tokenized_f1(prediction: str, answer: str) -> float:
    """SQuAD token F1 on squad_normalize'd whitespace tokens (1.0 when both are empty, 0.0 when one is)."""
    pred, gold = squad_normalize(prediction).split(), squad_normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_medgemma(row: dict, dataset: str = "") -> Scored:
    """Overall: tokenized F1 of every CLOSED/OPEN question; closed: normalised exact match on CLOSED questions
    ("accuracy on the closed subset"); open: tokenized F1 on OPEN questions (not a MedGemma table entry)."""
    answer_type = _answer_type(row)
    prediction, answer = _text(row.get("prediction")), _text(row["answer"])
    if answer_type == "CHOICE":
        return Scored(
            None, None, None, "CHOICE question: MedGemma reports MCQ accuracy separately; not scored"
        )
    f1 = tokenized_f1(prediction, answer)
    if answer_type == "CLOSED":
        return Scored(CLOSED, float(squad_normalize(prediction) == squad_normalize(answer)), f1)
    return Scored(OPEN, f1, f1)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

_MEK = "https://github.com/alibaba-damo-academy/MedEvalKit/blob/9b12e3b34232a8779cc1275417bf4f72f03d28e0"
_LMMS = "https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3"
_VLM = "https://github.com/open-compass/VLMEvalKit/blob/e8e78f05f3080fe28154f2130321f17951c3be94"

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "ours",
            "ours (strict)",
            ("medllava/metrics.py",),
            "exactly one of yes/no (CHOICE: option letter)",
            "token F1 (strict normalisation)",
            "mean of the per-question values",
            score_ours,
        ),
        Protocol(
            "llava_med",
            "LLaVA-Med v1.0",
            ("https://github.com/microsoft/LLaVA-Med/blob/v1.0.0/llava/eval/run_eval.py",),
            "yes/no accuracy (yes or no present, answer a substring)",
            "token recall (paper)",
            None,
            score_llava_med,
        ),
        Protocol(
            "medevalkit",
            "MedEvalKit",
            (
                f"{_MEK}/utils/utils.py",
                f"{_MEK}/utils/VQA_RAD/VQA_RAD.py",
                f"{_MEK}/utils/SLAKE/SLAKE.py",
                f"{_MEK}/utils/PMC_VQA/PMC_VQA.py",
            ),
            "exactly one of yes/no (substrings), answer a substring",
            "exact match after their parsing",
            "right / total",
            score_medevalkit,
        ),
        Protocol(
            "lmms_eval",
            "lmms-eval",
            (f"{_LMMS}/lmms_eval/tasks/slake/utils.py",),
            "normalised exact match",
            "normalised exact match",
            "normalised exact match, all questions",
            score_lmms_eval,
        ),
        Protocol(
            "vlmevalkit",
            "VLMEvalKit (judge)",
            (f"{_VLM}/vlmeval/dataset/image_shortqa.py", f"{_VLM}/vlmeval/dataset/utils/multiple_choice.py"),
            "judge hit",
            "judge hit",
            "mean judge hit, all questions",
            score_vlmevalkit,
            needs_judge=True,
        ),
        Protocol(
            "medgemma",
            "MedGemma",
            ("https://arxiv.org/abs/2507.05201", "https://huggingface.co/google/medgemma-4b-it"),
            "accuracy on the closed subset (SQuAD-normalised exact match)",
            "tokenized F1",
            "tokenized F1, all questions",
            score_medgemma,
        ),
    )
}


def get_protocols(names: str | Iterable[str] | None) -> list[Protocol]:
    """Protocols by comma-separated name (or list); None or "all": every protocol."""
    if names is None or names == "all":
        return list(PROTOCOLS.values())
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}; known: {', '.join(PROTOCOLS)}")
    return [PROTOCOLS[n] for n in dict.fromkeys(wanted)]


def dataset_of(name_or_source: str | None) -> str:
    """The per-dataset variant key for a set name or a row's `source` (vqa_rad, slake, pathvqa, pmc_vqa, other)."""
    text = str(name_or_source or "").lower().replace("-", "_")
    for key, aliases in (
        ("pmc_vqa", ("pmc_vqa", "pmcvqa")),
        ("pathvqa", ("pathvqa", "path_vqa")),
        ("slake", ("slake",)),
        ("vqa_rad", ("vqa_rad", "vqarad")),
    ):
        if any(a in text for a in aliases):
            return key
    return text or "other"


def score_protocol(protocol: Protocol, rows: list[dict], dataset: str | None = None) -> dict[str, Scored]:
    """{id: Scored} for every row; `dataset` None takes each row's `source`."""
    return {
        r["id"]: protocol.score(r, dataset if dataset is not None else dataset_of(r.get("source")))
        for r in rows
    }


def split_values(scores: dict[str, Scored]) -> dict[str, list[float] | None]:
    """The per-question values behind the closed, open and overall numbers (overall None if the harness has
    none), plus `pooled`: overall where there is one, else the closed and open values together."""
    closed = [s.value for s in scores.values() if s.group == CLOSED and s.value is not None]
    open_ = [s.value for s in scores.values() if s.group == OPEN and s.value is not None]
    overall = [s.overall for s in scores.values() if s.overall is not None]
    pooled = overall or closed + open_
    return {CLOSED: closed, OPEN: open_, "overall": overall or None, "pooled": pooled}


def pooled_by_id(scores: dict[str, Scored]) -> dict[str, float]:
    """Per-question pooled value (overall where the harness has one, else the group value), by id."""
    has_overall = any(s.overall is not None for s in scores.values())
    out = {}
    for qid, s in scores.items():
        value = s.overall if has_overall else (s.value if s.group is not None else None)
        if value is not None:
            out[qid] = float(value)
    return out


def notes_of(scores: dict[str, Scored]) -> dict[str, int]:
    return dict(Counter(s.note for s in scores.values() if s.note))
