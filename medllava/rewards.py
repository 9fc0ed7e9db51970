"""GRPO reward functions, picked by name from REWARD_FUNCS; accuracy rewards ARE the eval metrics (medllava.metrics).

Each function has TRL's reward signature: `fn(prompts, completions, **kwargs) -> list[float | None]`, where
`completions` are conversational (`[{"role": "assistant", "content": "..."}]`) or plain strings and `kwargs`
carry the dataset columns (`solution`, `answer_type`, ...). `None` means "does not apply to this row" (TRL
skips it), so answer-type-specific rewards can be combined with weights (GRPOConfig.reward_weights).

    from medllava.rewards import REWARD_FUNCS
    REWARD_FUNCS["accuracy"](prompts, [[{"role": "assistant", "content": "<answer>yes</answer>"}]],
                             solution=["yes"], answer_type=["CLOSED"])          # [1.0]

Rewards (Med-R1, arXiv:2503.13939, trains with format + accuracy rewards):
- format: 1.0 when the completion is `<answer>...</answer>`, optionally preceded by `<think>...</think>`.
- stated_format: 1.0 when the completion has the form the starter's SFT stages teach (issue 18): a closed answer
  states its finding, then the verdict as a sentence of its own ("This is an MRI of the head. No."); an open one
  is a short phrase (1-8 words on one line, no verdict); a choice answer names one option letter. Use it with
  `system_prompt: ""` (no request for `<answer>` tags).
- accuracy: the default accuracy metric of the row's answer type (metrics.ACCURACY_METRIC): strict yes/no
  for CLOSED, token F1 (partial credit, 1.0 on a normalised exact match) for OPEN, option letter for CHOICE.
- closed_accuracy / open_exact / open_f1 / choice: one metric each, None on rows of other answer types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from medllava import metrics
from medllava.prompts import FORMAT_SYSTEM_PROMPT, extract_choice, is_answer_format, split_stated
from medllava.schema import content_text, infer_answer_type

__all__ = ["FORMAT_SYSTEM_PROMPT", "REWARD_FUNCS", "completion_text", "get_reward_funcs"]


def completion_text(completion) -> str:
    """The text of one completion: a string, or a list of messages whose last one is the reply."""
    return completion if isinstance(completion, str) else content_text(completion[-1]["content"])


def _column(kwargs: dict, name: str, n: int) -> list:
    values = kwargs.get(name)
    return list(values) if values is not None else [None] * n


def format_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
    return [float(is_answer_format(completion_text(c))) for c in completions]


# an open answer's phrase: at most this many words (medsynth's longest open answers have four)
SHORT_PHRASE_WORDS = 8


def has_stated_form(text: str, answer_type: str) -> bool:
    """Whether a reply has the answer form of its type: CLOSED "<statement>. Yes|No.", OPEN a short phrase on one
    line that is not a yes/no verdict, CHOICE one option letter."""
    text = text.strip()
    if answer_type == "CLOSED":
        stated = split_stated(text)
        return stated is not None and len(stated[0].split()) >= 2
    if answer_type == "CHOICE":
        return extract_choice(text) is not None
    words = text.rstrip(".").split()
    verdict = text.lower().rstrip(" .!") in ("yes", "no") or split_stated(text) is not None
    return 0 < len(words) <= SHORT_PHRASE_WORDS and "\n" not in text and not verdict


def stated_format_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
    solutions = _column(kwargs, "solution", len(completions))
    types = _column(kwargs, "answer_type", len(completions))
    return [
        float(has_stated_form(completion_text(c), answer_type or infer_answer_type(str(solution))))
        for c, solution, answer_type in zip(completions, solutions, types, strict=True)
    ]


def accuracy_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
    solutions = _column(kwargs, "solution", len(completions))
    types = _column(kwargs, "answer_type", len(completions))
    return [
        metrics.accuracy(completion_text(c), str(solution), answer_type)
        for c, solution, answer_type in zip(completions, solutions, types, strict=True)
    ]


def _typed(metric_name: str, answer_type: str) -> Callable:
    """A reward that scores rows of one answer type with one metric and returns None for the others."""

    def reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
        solutions = _column(kwargs, "solution", len(completions))
        types = _column(kwargs, "answer_type", len(completions))
        out = []
        for c, solution, row_type in zip(completions, solutions, types, strict=True):
            row_type = row_type or infer_answer_type(str(solution))
            out.append(
                metrics.METRICS[metric_name](completion_text(c), str(solution))
                if row_type == answer_type
                else None
            )
        return out

    reward.__name__ = f"{answer_type.lower()}_{metric_name}"
    return reward


REWARD_FUNCS: dict[str, Callable] = {
    "format": format_reward,
    "stated_format": stated_format_reward,
    "accuracy": accuracy_reward,
    "closed_accuracy": _typed("strict_closed_accuracy", "CLOSED"),
    "open_exact": _typed("strict_exact_match", "OPEN"),
    "open_f1": _typed("strict_token_f1", "OPEN"),
    "choice": _typed("strict_choice_accuracy", "CHOICE"),
}


def get_reward_funcs(names: Sequence[str]) -> list[Callable]:
    """The reward functions named, in order; each function's __name__ is its registry name (TRL logs by it)."""
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; choose from {sorted(REWARD_FUNCS)}")
    funcs = []
    for name in names:
        fn = REWARD_FUNCS[name]

        def named(prompts, completions, _fn=fn, **kwargs):
            return _fn(prompts, completions, **kwargs)

        named.__name__ = name
        funcs.append(named)
    return funcs
