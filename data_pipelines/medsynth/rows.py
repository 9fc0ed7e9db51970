"""Row writing: the project-schema rows of every stage from the ground truth of the images. Captions and
descriptions (stage 1; each with a machine-readable `facts` field for fact-recall scoring), conversations of
2-4 turns (stage 2; each turn a row of the TURNS table: wordings and an answer sentence), VQA rows (stage 3;
CLOSED answers stated or bare, see `vqa_rows`) and GRPO prompt rows with a verifiable `solution`, from the
picked questions."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from data_pipelines.medsynth.vocab import (
    CONTRAST_TERMS,
    COUNT_WORDS,
    NOUNS,
    REGION_PHRASE,
    SOURCE_NAME,
    cap,
    facts,
    lesion_ref,
    plural,
    quadrant,
    study_phrase,
)
from medllava.prompts import stated_answer
from medllava.schema import conversation, make_vqa_row, message

# --- captions (stage 1) -------------------------------------------------------------------------------------

CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of this image.",
    "Summarise what this image shows in one sentence.",
    "Write a brief caption for this image.",
    "What does this image show? Answer briefly.",
    "Provide a concise description of the image.",
    "Briefly describe the findings in this image.",
    "Caption this medical image.",
)
# "Describe this image."-style requests, answered in two sentences: the study (modality and region),
# then the findings (count, size, contrast, position), all from the ground truth.
DESCRIBE_INSTRUCTIONS = (
    "Describe this image.",
    "Describe this image in a few sentences.",
    "What do you see in this image?",
    "Can you describe this image for me?",
    "Please describe the image and its findings.",
    "Tell me what this image shows.",
)
DESCRIBE_SHARE = 0.5  # of the caption rows


def contrast_word(inst: dict, rnd: random.Random) -> str:
    terms = CONTRAST_TERMS.get(inst["modality"])
    generic = "bright" if inst["contrast"] == "bright" else "dark"
    if terms and rnd.random() < 0.5:
        return terms[0] if inst["contrast"] == "bright" else terms[1]
    return generic


def finding_phrase(inst: dict, rnd: random.Random) -> str:
    """'two small hypodense lesions in the upper left of the image'."""
    n = inst["count"]
    noun = plural(rnd.choice(NOUNS), n)
    where = rnd.choice(("in the {q} of the image", "in the {q} part of the image", "in the {q} quadrant"))
    return (
        f"{COUNT_WORDS[n]} {inst['size']} {contrast_word(inst, rnd)} {noun} {where.format(q=quadrant(inst))}"
    )


def caption(inst: dict, rnd: random.Random) -> str:
    study = study_phrase(inst)
    if inst["count"] == 0:
        return rnd.choice(
            (
                f"{cap(study)} with no focal lesion.",
                f"{cap(study)}. No focal lesion is seen.",
                f"{cap(study)}; no lesion is visible.",
                f"{cap(study)} without any focal abnormality.",
            )
        )
    finding = finding_phrase(inst, rnd)
    return rnd.choice(
        (
            f"{cap(study)} showing {finding}.",
            f"{cap(study)} with {finding}.",
            f"{cap(study)}. There {'is' if inst['count'] == 1 else 'are'} {finding}.",
            f"{cap(study)}: {finding}.",
        )
    )


def description(inst: dict, rnd: random.Random) -> str:
    """'This is an MRI image of the head. There are two small hyperintense lesions in the upper left of the
    image.' (no lesion: 'No focal lesion is seen.')."""
    study = f"This is {study_phrase(inst)}."
    n = inst["count"]
    if n == 0:
        return f"{study} {rnd.choice(('No focal lesion is seen.', 'There is no focal lesion.', 'I see no lesion.'))}"
    findings = f"There {'is' if n == 1 else 'are'} {finding_phrase(inst, rnd)}."
    return f"{study} {findings}"


# --- conversations (stage 2) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation: the question (one of `wordings`, str.format templates; turns about the
    lesions may use the fields of `vocab.lesion_ref`: {ref} {be} {Be} {does} {it}) and its answer sentence."""

    wordings: tuple[str, ...]
    answer: Callable[[dict, random.Random], str]  # (instance, rnd) -> the answer, true to the ground truth
    about_lesions: bool = False  # draws the lesion reference before the wording


def they_are(inst: dict) -> str:
    return "It is" if inst["count"] == 1 else "They are"


def findings_answer(inst: dict, rnd: random.Random) -> str:
    if not inst["count"]:
        return rnd.choice(
            (
                "No. I do not see any focal lesion in this image.",
                "No focal lesion is visible; the tissue looks uniform apart from normal structures.",
            )
        )
    be = "is" if inst["count"] == 1 else "are"
    return f"Yes. There {be} {finding_phrase(inst, rnd)}."


def count_answer(inst: dict, _rnd: random.Random) -> str:
    n = inst["count"]
    if n == 0:
        return "None. There are no lesions in this image."
    return "There is one lesion." if n == 1 else f"There are {COUNT_WORDS[n]} lesions."


def location_answer(inst: dict, _rnd: random.Random) -> str:
    where = f"in the {inst['position']} half of the image, on the {inst['side']} side of the image"
    return f"{they_are(inst)} {where}."


def size_answer(inst: dict, _rnd: random.Random) -> str:
    detail = (
        "a small fraction of the field of view"
        if inst["size"] == "small"
        else "a sizeable part of the quadrant"
    )
    return f"{they_are(inst)} {inst['size']}, covering {detail}."


def contrast_sentence(inst: dict, _rnd: random.Random) -> str:
    relation = "brighter" if inst["contrast"] == "bright" else "darker"
    terms = CONTRAST_TERMS.get(inst["modality"])
    term = f" ({terms[0] if inst['contrast'] == 'bright' else terms[1]})" if terms else ""
    return f"{they_are(inst)} {relation} than the surrounding tissue{term}."


TURNS = {
    "overview": Turn(
        (
            "What type of image is this, and what does it show?",
            "What am I looking at here?",
            "Can you tell me what kind of scan this is?",
            "Which imaging modality and body region is this?",
        ),
        lambda inst, _rnd: f"This is {study_phrase(inst)}.",
    ),
    "findings": Turn(
        (
            "Do you see any abnormality?",
            "Is there anything abnormal in this image?",
            "Are there any focal lesions?",
            "What are the findings?",
            "Is anything unusual visible?",
        ),
        findings_answer,
    ),
    "count": Turn(
        (
            "How many lesions can you see?",
            "How many lesions are there in total?",
            "Can you count the lesions?",
        ),
        count_answer,
    ),
    "location": Turn(
        (
            "Where exactly {be} {ref}?",
            "Which part of the image {be} {ref} in?",
            "Can you describe where {ref} {be}?",
        ),
        location_answer,
        about_lesions=True,
    ),
    "size": Turn(("How big {be} {ref}?", "{Be} {ref} large or small?"), size_answer, about_lesions=True),
    "contrast": Turn(
        (
            "How {does} {ref} compare in brightness with the tissue around {it}?",
            "{Be} {ref} brighter or darker than the surroundings?",
        ),
        contrast_sentence,
        about_lesions=True,
    ),
    "region": Turn(
        ("Which part of the body is this?", "What anatomy is shown?"),
        lambda inst, _rnd: f"The image shows {REGION_PHRASE[inst['region']]}.",
    ),
}


def say(turn: Turn, inst: dict, rnd: random.Random) -> tuple[str, str]:
    """(question, answer) of one turn about one image."""
    fields = lesion_ref(inst, rnd) if turn.about_lesions else {}
    question = rnd.choice(turn.wordings).format(**fields)
    return question, turn.answer(inst, rnd)


def dialogue(inst: dict, rnd: random.Random) -> list[tuple[str, str]]:
    """2-4 turns: an opening (overview or findings), then follow-ups that fit the ground truth."""
    opening = rnd.choice(("overview", "findings"))
    follow = ["findings" if opening == "overview" else "overview", "count"]
    if inst["count"]:
        follow += ["location", "size", "contrast"]
    if opening == "findings":
        follow.append("region")
    rnd.shuffle(follow)
    if "findings" in follow and inst["count"]:  # lesion follow-ups only after the lesions were mentioned
        follow.remove("findings")
        follow.insert(0, "findings")
    names = [opening] + follow[: rnd.randint(1, 3)]
    return [say(TURNS[name], inst, rnd) for name in names]


# --- rows in the project schema -----------------------------------------------------------------------------


def _meta(inst: dict) -> dict:
    return {
        "modality": inst["modality"],
        "region": inst["region"],
        "source": SOURCE_NAME,
        "instance": inst["id"],
    }


def caption_rows(instances, n, split, rnd) -> list[dict]:
    """One caption or description per row (DESCRIBE_SHARE of them "Describe this image."-style, answered in
    sentences), with `facts`: what the answer states, machine-readable (`vocab.facts`)."""
    rows = []
    for i in range(n):
        inst = instances[i % len(instances)]
        if rnd.random() < DESCRIBE_SHARE:
            exchange = (rnd.choice(DESCRIBE_INSTRUCTIONS), description(inst, rnd))
        else:
            exchange = (rnd.choice(CAPTION_INSTRUCTIONS), caption(inst, rnd))
        rows.append(
            {
                "id": f"{SOURCE_NAME}-cap-{split}-{i:05d}",
                "images": [inst["image"]],
                "messages": conversation([exchange]),
                **_meta(inst),
                "facts": facts(inst),
            }
        )
    return rows


def instruct_rows(instances, n, split, rnd) -> list[dict]:
    # start half-way so the first images are not all captioned and discussed alike
    offset = len(instances) // 2
    rows = []
    for i in range(n):
        inst = instances[(i + offset) % len(instances)]
        rows.append(
            {
                "id": f"{SOURCE_NAME}-ins-{split}-{i:05d}",
                "images": [inst["image"]],
                "messages": conversation(dialogue(inst, rnd)),
                **_meta(inst),
                "facts": facts(inst),
            }
        )
    return rows


def vqa_answer_text(candidate: dict, closed_answers: str = "stated") -> str:
    """The assistant's answer: a CLOSED question's statement then its verdict ("There is no lesion. No.") when
    `closed_answers` is "stated", else the bare canonical answer ("no", "left", "2", "mri")."""
    if candidate["answer_type"] == "CLOSED" and closed_answers == "stated":
        return stated_answer(candidate["statement"], candidate["answer"])
    return candidate["answer"]


def vqa_rows(picked, split, closed_answers: str = "stated") -> list[dict]:
    """VQA rows; `short_answer` is the canonical answer (what `medllava.prompts.extract_answer` gives of the
    assistant's text, up to case)."""
    return [
        make_vqa_row(
            f"{SOURCE_NAME}-vqa-{split}-{i:05d}",
            [c["instance"]["image"]],
            c["question"],
            vqa_answer_text(c, closed_answers),
            c["answer_type"],
            question_type=c["question_type"],
            short_answer=c["answer"],
            **_meta(c["instance"]),
        )
        for i, c in enumerate(picked)
    ]


def grpo_rows(picked, split) -> list[dict]:
    return [
        {
            "id": f"{SOURCE_NAME}-grpo-{split}-{i:05d}",
            "images": [c["instance"]["image"]],
            "prompt": [message("user", c["question"], 1)],
            "solution": c["answer"],
            "answer_type": c["answer_type"],
            "question_type": c["question_type"],
            **_meta(c["instance"]),
        }
        for i, c in enumerate(picked)
    ]
