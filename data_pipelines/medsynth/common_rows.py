"""What the multi-image families (`longitudinal`, `volume_rows`) share: a spec's unit fields, the head of an
instance line, their question kinds and candidates, and their VQA rows (several images, the role line of
`medllava.image_roles`)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data_pipelines.medsynth.rows import vqa_answer_text
from data_pipelines.medsynth.vocab import SOURCE_NAME
from medllava.image_roles import ImageInput, with_image_roles
from medllava.schema import make_vqa_row


def image_stem(spec_id: str) -> str:
    """The start of an instance's PNG names under images/: its id without the source name."""
    return spec_id.removeprefix(SOURCE_NAME + "-")


def unit_fields(unit) -> dict:
    """What a spec copies from its background unit (a `backgrounds.Unit` or a `volume_rows.Slab`)."""
    return dict(unit=unit.key, source=unit.source, modality=unit.modality, region=unit.region)


def instance_head(spec, family: str, file: str) -> dict:
    """The first fields of an instance line (a spec's id, split, unit and source; the family; the file)."""
    return dict(id=spec.id, family=family, split=spec.split, unit=spec.unit, source=spec.source, file=file)


@dataclass(frozen=True)
class MultiQuestion:
    question_type: str
    answer_type: str
    wordings: tuple[str, ...]
    share: float  # of a split's rows (`questions.select_vqa`)


def candidate(
    kind: MultiQuestion, instance: dict, rnd: random.Random, answer: str, statement: str | None = None
) -> dict:
    """A candidate question about an instance, one of the kind's wordings (answer: the canonical short answer;
    statement: for CLOSED kinds, the finding a stated answer states first)."""
    return dict(
        instance=instance,
        question_type=kind.question_type,
        answer_type=kind.answer_type,
        question=rnd.choice(kind.wordings),
        answer=answer,
        statement=statement,
    )


def multi_image_rows(
    picked: Sequence[dict],
    split: str,
    tag: str,
    images: Callable[[dict], list[str]],
    inputs: Callable[[dict], list[ImageInput]],
    roles: Callable[[dict], list[dict]] | None = None,
) -> list[dict]:
    """VQA rows (ids {SOURCE_NAME}-{tag}-vqa-{split}-NNNNN): an instance's `images`, the role line of its
    `inputs` before the question, CLOSED answers stated and OPEN ones the canonical phrase (`rows.vqa_answer_text`),
    `image_roles` where `roles` is given, `short_answer`, `family`, `instance` and `unit` on every row."""
    rows = []
    for i, c in enumerate(picked):
        inst = c["instance"]
        rows.append(
            make_vqa_row(
                f"{SOURCE_NAME}-{tag}-vqa-{split}-{i:05d}",
                images(inst),
                with_image_roles(c["question"], inputs(inst)),
                vqa_answer_text(c),
                c["answer_type"],
                image_roles=roles(inst) if roles else None,
                question_type=c["question_type"],
                short_answer=c["answer"],
                modality=inst["modality"],
                region=inst["region"],
                source=SOURCE_NAME,
                family=inst["family"],
                instance=inst["id"],
                unit=inst["unit"],
            )
        )
    return rows
