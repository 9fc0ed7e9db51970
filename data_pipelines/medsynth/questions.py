"""Question templates as data. Each row of a table is a question kind: its question type and answer type,
the wordings, the answer function, the statement a stated closed answer opens with, what it asks about, whether
it needs a lesion and its share of a split's VQA rows. `ask` turns a kind and an image into questions;
`select_vqa` and `select_grpo` pick a split's questions, answers balanced within each kind.

Every random draw comes from the caller's `rnd`, in a fixed order per image and kind: the lesion reference
(kinds that need a lesion), the asked values, then for each asked value its phrase and its wording (a kind
with a single wording draws none). That order is part of the output: changing it changes the bytes of a build.
Statements draw nothing: they are filled from the image's ground truth (`vocab.finding_fields`) and the
question's own lesion reference, so "Is the nodule large?" gets "The nodule is small. No."
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from data_pipelines.medsynth.vocab import (
    COUNT_WORDS,
    MODALITIES,
    MODALITY_ASKED,
    QUADRANTS,
    REGION_PHRASE,
    UNSEEN,
    contrast_answer,
    finding_fields,
    lesion_ref,
    quadrant,
    yes,
)

# --- what a kind asks about: (instance, rnd, vocab) -> the asked values, one question each ------------------


def once(_inst: dict, _rnd: random.Random, _vocab: dict) -> tuple:
    """One question, whose answer is the image's own value (OPEN, CHOICE, presence)."""
    return (None,)


def each(*values: str) -> Callable:
    """One question per value, e.g. "Is the lesion small?" and "Is the lesion large?"."""
    return lambda _inst, _rnd, _vocab: values


def truth_and_other(key: str) -> Callable:
    """The image's own value of `key` (a yes question), then another one seen in the split (a no question)."""
    return lambda inst, rnd, vocab: (inst[key], other_value(inst[key], vocab[key], rnd))


def other_value(value: str, pool: Sequence[str], rnd: random.Random) -> str:
    """A value different from `value`, drawn from `pool` (the split's observed values, with their frequencies,
    so that 'no' questions ask about each value about as often as 'yes' questions do)."""
    others = [v for v in pool if v != value]
    return rnd.choice(others) if others else value


def count_asked(inst: dict, rnd: random.Random, _vocab: dict) -> tuple:
    """'more than one', then a count of 1-3: half the time the true one (never for an image without lesions),
    else another."""
    n = inst["count"]
    k = rnd.choice([k for k in (1, 2, 3) if k != n]) if rnd.random() < 0.5 or n == 0 else n
    return ("more than one", COUNT_WORDS[k])


def count_closed_answer(inst: dict, asked: str) -> str:
    if asked == "more than one":
        return yes(inst["count"] > 1)
    return yes(asked == COUNT_WORDS[inst["count"]])


def as_is(asked, _rnd: random.Random):
    return asked


def modality_asked(asked: str, rnd: random.Random) -> str:
    """A noun phrase for a modality in "Is this {a}?", one of three synonyms."""
    return rnd.choice(MODALITY_ASKED[asked])


def region_asked(asked: str, _rnd: random.Random) -> str:
    return REGION_PHRASE[asked]


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question. `wordings` are str.format templates, one drawn per question (or a mapping asked
    value -> templates); their fields: {a} (the asked value's phrase) and, for kinds that need a lesion,
    those of `vocab.lesion_ref` ({ref} {Ref} {be} {Be} {does} {Does} {it} {its}). `statement` (CLOSED kinds): the template
    of the finding a stated answer states before its verdict (or a mapping asked value -> template), with the
    fields of `vocab.finding_fields` ({modality} {region} {is} {lesions} {where} {side} {position} {size}
    {contrast}) and the lesion reference's."""

    question_type: str
    answer_type: str  # OPEN, CLOSED or CHOICE
    wordings: tuple[str, ...] | dict[str, tuple[str, ...]]
    answer: Callable[[dict, str | None], str]  # (instance, asked value) -> the canonical answer
    asks: Callable = once  # (instance, rnd, vocab) -> the asked values, one question each
    phrase: Callable = as_is  # (asked value, rnd) -> {a}
    needs_lesion: bool = False  # asked only about images with lesions
    share: float = 0.0  # of a split's VQA rows
    test_share: float | None = None  # the held-out test split's share, where it differs
    # CHOICE: every possible answer (the three distractors are drawn from the others)
    options: tuple[str, ...] = ()
    statement: str | dict[str, str] | None = None


SIDE_STATEMENT = "{Ref} {be} on the {side} side of the image."
HALF_STATEMENT = "{Ref} {be} in the {position} half of the image."


SIDE_WORDINGS = ("{Be} {ref} on the {a} side of the image?", "{Be} {ref} in the {a} half?")
HALF_WORDINGS = ("{Be} {ref} in the {a} half of the image?", "{Be} {ref} in the {a} part?")

# VQA (stage 3 and the yes/no and short-answer GRPO prompts), in the order the candidates are drawn. The
# held-out test split asks more modality questions (~26% of its rows instead of 16%), so that each of the 7
# modalities gets >= 20 of them and the per-modality accuracy means something.
VQA_QUESTIONS = (
    QuestionKind(
        "MODALITY",
        "OPEN",
        (
            "What imaging modality is this?",
            "Which modality was used to acquire this image?",
            "What kind of image is this?",
            "What type of imaging is shown?",
            "How was this image acquired?",
        ),
        lambda inst, _: inst["modality"].lower(),
        share=0.08,
        test_share=0.15,
    ),
    QuestionKind(
        "ORGAN",
        "OPEN",
        (
            "Which body region is shown?",
            "What part of the body is imaged?",
            "What organ or region does this show?",
            "Which anatomical region is this?",
            "What body part is in this image?",
        ),
        lambda inst, _: inst["region"],
        share=0.08,
    ),
    QuestionKind(
        "COUNT",
        "OPEN",
        (
            "How many lesions are there?",
            "How many focal lesions can be seen?",
            "What is the number of lesions in this image?",
            "How many nodules are visible?",
        ),
        lambda inst, _: str(inst["count"]),
        share=0.08,
    ),
    QuestionKind(
        "POS",
        "OPEN",
        {
            "side": (
                "On which side of the image {be} {ref}?",
                "{Be} {ref} on the left or the right side of the image?",
            ),
            "position": (
                "{Be} {ref} in the upper or the lower part of the image?",
                "In which half of the image, upper or lower, {be} {ref}?",
            ),
            "quadrant": ("In which quadrant of the image {be} {ref}?", "Where in the image {be} {ref}?"),
        },
        lambda inst, asked: quadrant(inst) if asked == "quadrant" else inst[asked],
        asks=each("side", "position", "quadrant"),
        needs_lesion=True,
        share=0.10,
    ),
    QuestionKind(
        "SIZE",
        "OPEN",
        ("{Be} {ref} small or large?", "What is the size of {ref}, small or large?"),
        lambda inst, _: inst["size"],
        needs_lesion=True,
        share=0.05,
    ),
    QuestionKind(
        "ATTRIB",
        "OPEN",
        (
            "{Be} {ref} brighter or darker than the surrounding tissue?",
            "Compared with {its} surroundings, {be} {ref} brighter or darker?",
        ),
        lambda inst, _: contrast_answer(inst),
        needs_lesion=True,
        share=0.05,
    ),
    QuestionKind(
        "MODALITY",
        "CLOSED",
        ("Is this {a}?", "Is the image {a}?", "Would you call this {a}?"),
        lambda inst, asked: yes(asked == inst["modality"]),
        asks=truth_and_other("modality"),
        phrase=modality_asked,
        share=0.08,
        test_share=0.15,
        statement="This is {modality}.",
    ),
    QuestionKind(
        "ORGAN",
        "CLOSED",
        ("Does this image show {a}?", "Is this an image of {a}?", "Is {a} the region shown?"),
        lambda inst, asked: yes(asked == inst["region"]),
        asks=truth_and_other("region"),
        phrase=region_asked,
        share=0.08,
        statement="This image shows {region}.",
    ),
    QuestionKind(
        "PRES",
        "CLOSED",
        (
            "Is there a lesion in this image?",
            "Is any focal lesion visible?",
            "Can you see a nodule?",
            "Are there any lesions?",
            "Is a focal lesion present?",
            "Does this image contain a lesion?",
        ),
        lambda inst, _: yes(inst["count"]),
        share=0.12,
        statement="There {is} {lesions}{where}.",
    ),
    QuestionKind(
        "COUNT",
        "CLOSED",
        {
            "more than one": ("Is there more than one lesion?",),
            "one": ("Is there exactly one lesion?",),
            "two": ("Are there exactly two lesions?",),
            "three": ("Are there exactly three lesions?",),
        },
        count_closed_answer,
        asks=count_asked,
        share=0.08,
        statement="There {is} {lesions}.",
    ),
    QuestionKind(
        "POS",
        "CLOSED",
        {"left": SIDE_WORDINGS, "right": SIDE_WORDINGS, "upper": HALF_WORDINGS, "lower": HALF_WORDINGS},
        lambda inst, asked: yes(asked in (inst["side"], inst["position"])),
        asks=each("left", "right", "upper", "lower"),
        needs_lesion=True,
        share=0.10,
        statement={
            "left": SIDE_STATEMENT,
            "right": SIDE_STATEMENT,
            "upper": HALF_STATEMENT,
            "lower": HALF_STATEMENT,
        },
    ),
    QuestionKind(
        "SIZE",
        "CLOSED",
        ("{Be} {ref} {a}?",),
        lambda inst, asked: yes(inst["size"] == asked),
        asks=each("small", "large"),
        needs_lesion=True,
        share=0.05,
        statement="{Ref} {be} {size}.",
    ),
    QuestionKind(
        "ATTRIB",
        "CLOSED",
        ("{Be} {ref} {a} than the surrounding tissue?", "{Does} {ref} look {a} than {its} surroundings?"),
        lambda inst, asked: yes(contrast_answer(inst) == asked),
        asks=each("brighter", "darker"),
        needs_lesion=True,
        share=0.05,
        statement="{Ref} {be} {contrast} than the surrounding tissue.",
    ),
)

# Lettered CHOICE questions (GRPO), one quota each, in this order.
CHOICE_QUESTIONS = (
    QuestionKind(
        "MODALITY",
        "CHOICE",
        ("Which imaging modality was used?",),
        lambda inst, _: inst["modality"].lower(),
        options=tuple(m.lower() for m in MODALITIES),
    ),
    QuestionKind(
        "ORGAN",
        "CHOICE",
        ("Which body region is shown?",),
        lambda inst, _: inst["region"],
        options=tuple(sorted(REGION_PHRASE)),
    ),
    QuestionKind(
        "COUNT",
        "CHOICE",
        ("How many lesions are visible?",),
        lambda inst, _: str(inst["count"]),
        options=("0", "1", "2", "3"),
    ),
    QuestionKind(
        "POS",
        "CHOICE",
        ("In which quadrant of the image {be} {ref}?",),
        lambda inst, _: quadrant(inst),
        needs_lesion=True,
        options=QUADRANTS,
    ),
)
GRPO_CHOICE_SHARE = 0.4  # of the GRPO rows; the rest are VQA questions
LETTERS = "ABCD"


def vqa_table(split: str) -> tuple[QuestionKind, ...]:
    """VQA_QUESTIONS with the split's shares (the held-out test and unseen splits ask more modality questions)."""
    if split not in ("test", UNSEEN):
        return VQA_QUESTIONS
    return tuple(k if k.test_share is None else replace(k, share=k.test_share) for k in VQA_QUESTIONS)


# --- asking -------------------------------------------------------------------------------------------------


def ask(kind: QuestionKind, inst: dict, rnd: random.Random, vocab: dict | None) -> list[dict]:
    """The questions of one kind about one image, as candidates: instance, question_type, answer_type,
    question, answer (the canonical short answer), statement (CLOSED kinds: the finding the question asks about,
    true to the image), asked. `vocab`: the split's observed values per key (for truth_and_other)."""
    fields = lesion_ref(inst, rnd) if kind.needs_lesion else {}
    out = []
    for asked in kind.asks(inst, rnd, vocab):
        phrase = kind.phrase(asked, rnd)
        wordings = kind.wordings[asked] if isinstance(kind.wordings, dict) else kind.wordings
        wording = rnd.choice(wordings) if len(wordings) > 1 else wordings[0]
        statement = None
        if kind.statement is not None:
            template = kind.statement[asked] if isinstance(kind.statement, dict) else kind.statement
            statement = template.format(**finding_fields(inst), **fields)
        out.append(
            dict(
                instance=inst,
                question_type=kind.question_type,
                answer_type=kind.answer_type,
                question=wording.format(a=phrase, **fields),
                answer=kind.answer(inst, asked),
                statement=statement,
                asked=asked,
            )
        )
    return out


def vqa_candidates(
    instances: Sequence[dict], kind: QuestionKind, vocab: dict, rnd: random.Random
) -> list[dict]:
    return [
        c for inst in instances if inst["count"] or not kind.needs_lesion for c in ask(kind, inst, rnd, vocab)
    ]


def choice_question(inst: dict, kind: QuestionKind, rnd: random.Random) -> dict | None:
    """A lettered CHOICE question: the true option among three distractors, in a random slot (answer: its
    letter). None if the kind needs a lesion and the image has none."""
    if kind.needs_lesion and not inst["count"]:
        return None
    (candidate,) = ask(kind, inst, rnd, None)
    truth = candidate["answer"]
    distractors = rnd.sample([p for p in kind.options if p != truth], 3)
    slot = rnd.randrange(4)
    options = distractors[:slot] + [truth] + distractors[slot:]
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))
    candidate.update(
        question=f"{candidate['question']}\n{lines}\nAnswer with the letter of the correct option.",
        answer=LETTERS[slot],
        asked=truth,
    )
    return candidate


# --- picking a split's questions ----------------------------------------------------------------------------


def _modality(candidate: dict) -> str:
    return candidate["instance"]["modality"]


def balanced_pick(
    candidates: list[dict], n: int, rnd: random.Random, key=lambda c: c["answer"], spread=_modality
) -> list[dict]:
    """n candidates, answers as even as possible (round robin over answer groups), at most one per instance
    while unused instances remain, and within an answer the `spread` values (modalities) as even as possible."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        groups[key(c)].append(c)
    for g in groups.values():
        rnd.shuffle(g)
    picked, used, spread_count = [], set(), Counter()
    answers = sorted(groups)
    while len(picked) < n and any(groups.values()):
        order = answers[:]
        rnd.shuffle(order)
        for answer in order:
            group = groups[answer]
            if not group or len(picked) >= n:
                continue
            i = min(
                range(len(group)),
                key=lambda k: (group[k]["instance"]["id"] in used, spread_count[answer, spread(group[k])]),
            )
            choice = group.pop(i)
            used.add(choice["instance"]["id"])
            spread_count[answer, spread(choice)] += 1
            picked.append(choice)
    return picked


def quotas(n: int, shares: Sequence[float]) -> list[int]:
    """Integers proportional to `shares` summing to n (largest remainders)."""
    exact = [n * s / sum(shares) for s in shares]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: out[i] - exact[i])[: n - sum(out)]:
        out[i] += 1
    return out


def select_vqa(
    instances: Sequence[dict],
    n: int,
    rnd: random.Random,
    table=VQA_QUESTIONS,
    candidate: Callable | None = None,
    spread=_modality,
) -> list[dict]:
    """n questions in the table's shares, answers balanced within each question kind; a kind short of
    candidates (few images with lesions in a small build) leaves its rows to the others. `candidate(kind,
    instance, rnd)` (a candidate or None) stands for `vqa_candidates` where given; `spread` as `balanced_pick`."""
    if candidate is None:
        vocab = {k: [inst[k] for inst in instances] for k in ("modality", "region")}
        pools = [vqa_candidates(instances, kind, vocab, rnd) for kind in table]
    else:
        pools = [[c for inst in instances if (c := candidate(kind, inst, rnd))] for kind in table]
    picked = []
    for pool, quota in zip(pools, quotas(n, [kind.share for kind in table]), strict=True):
        chosen = balanced_pick(pool, quota, rnd, spread=spread)
        taken = {id(c) for c in chosen}
        pool[:] = [c for c in pool if id(c) not in taken]
        picked += chosen
    for pool in pools:  # top up from what is left, kind by kind
        if len(picked) >= n:
            break
        picked += balanced_pick(pool, n - len(picked), rnd, spread=spread)
    rnd.shuffle(picked)
    return picked[:n]


def select_grpo(instances: Sequence[dict], n: int, rnd: random.Random) -> list[dict]:
    """40% lettered CHOICE (modality, region, count, quadrant; in equal quotas), 60% yes/no and short-answer
    questions."""
    picked = []
    n_choice = round(GRPO_CHOICE_SHARE * n)
    for i, kind in enumerate(CHOICE_QUESTIONS):
        quota = n_choice // len(CHOICE_QUESTIONS) + (i < n_choice % len(CHOICE_QUESTIONS))
        candidates = [c for inst in instances if (c := choice_question(inst, kind, rnd))]
        picked += balanced_pick(candidates, quota, rnd)
    picked += select_vqa(instances, n - len(picked), rnd)
    rnd.shuffle(picked)
    return picked[:n]
