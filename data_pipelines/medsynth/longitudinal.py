"""Longitudinal pairs: a prior and a current image of the same background with lesions that are new, grown,
shrunk, resolved or unchanged between them, exact ground truth, and VQA rows about the change.

Built by `python -m data_pipelines.medsynth.multi` (see there); not part of the default `make data` build.

A pair is one background unit of the medsynth catalogue (so it belongs to that unit's split, the split the
default build gives it), one augmentation for both studies (crop and zoom, flips, window, gamma: `findings`),
then for the current study a small jitter of the window (up to +-WINDOW_JITTER grey levels at each end) and
gamma (up to +-3%) and its own Gaussian noise: the same picture taken again. Each pair has one `change`:

- grown / shrunk: one lesion, in both studies, its radii on the smaller study GROWTH (0.55-0.7) times those on
  the larger, so its area is 2-3.3 times larger (smaller) on the current study; same centre, same orientation;
- new: 1-3 lesions on the current study only, sometimes beside one unchanged lesion;
- resolved: 1-2 lesions on the prior study only, sometimes beside one unchanged lesion;
- unchanged: 1-2 lesions with the same geometry on both studies.

All lesions of a pair lie in one quadrant (the cells of `findings._place`), each is checked to show (core-to-ring
contrast at 112 px, `findings.measured_contrasts`) on every study it is on. The ground truth of each pair (one line
of instances_longitudinal_<split>.jsonl) holds both augmentations, both dates and every lesion's geometry on each
study (None where it is absent) with its area in pixels, so every answer can be re-derived.
"""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.medsynth.backgrounds import SOURCE_BY_KEY, Unit
from data_pipelines.medsynth.common_rows import (
    MultiQuestion,
    candidate,
    image_stem,
    instance_head,
    multi_image_rows,
    unit_fields,
)
from data_pipelines.medsynth.findings import (
    ATTEMPTS,
    MIN_CONTRAST,
    NOISE_SIGMA,
    Spec,
    _draw,
    _luminance,
    _place,
    _to_image,
    add_noise,
    apply_augment,
    balanced_units,
    measured_contrasts,
    sample_augment,
)
from data_pipelines.medsynth.questions import select_vqa
from data_pipelines.medsynth.vocab import COUNT_WORDS, IN_DOMAIN, SOURCE_NAME, plural
from medllava.image_roles import ImageInput
from medllava.schema import CLOSED, OPEN

FAMILY = "longitudinal"
CHANGES = ("new", "grown", "shrunk", "resolved", "unchanged")
# How often each change is drawn: "new" most, so that about a third of the pairs answer "yes" to "Is there a
# new lesion?"; grown, shrunk and unchanged single lesions give "Has the lesion grown?" its yes and no answers.
CHANGE_WEIGHTS = (0.3, 0.2, 0.15, 0.15, 0.2)
GROWTH = (0.55, 0.7)  # radius of the smaller study over the larger one: an area ratio of 2.0-3.3
WINDOW_JITTER = 4.0  # grey levels, each end of the window, between the prior and the current study
GAMMA_JITTER = 0.03
FIRST_DATE = datetime.date(2018, 1, 1)
PRIOR_SPREAD_DAYS = 5 * 365  # prior studies between 2018 and 2022
INTERVAL_DAYS = (30, 730)  # between the prior and the current study


@dataclass
class PairSpec(Spec):
    """A `findings.Spec` whose `count` is the lesion sites on either study (what `findings._place` places)."""

    change: str
    changed: int  # lesions that change (new, resolved; 1 for grown/shrunk; all of them when unchanged)
    steady: int  # unchanged lesions beside them


def sample_pairs(units: Sequence[Unit], split: str, n: int, seed: int) -> list[PairSpec]:
    """n pair specs of a split: units as `findings.balanced_units` draws them, then the change and the lesions."""
    rng = np.random.default_rng([seed, IN_DOMAIN.index(split), 101])
    specs = []
    for i, unit in enumerate(balanced_units(units, split, n, rng)):
        change = CHANGES[rng.choice(len(CHANGES), p=CHANGE_WEIGHTS)]
        if change == "new":
            changed = int(rng.integers(1, 4))
            steady = int(changed < 3 and rng.random() < 0.3)
        elif change == "resolved":
            changed, steady = int(rng.integers(1, 3)), int(rng.random() < 0.3)
        elif change == "unchanged":
            changed, steady = int(rng.integers(1, 3)), 0
        else:
            changed, steady = 1, 0
        specs.append(
            PairSpec(
                id=f"{SOURCE_NAME}-long-{split}-{i:05d}",
                split=split,
                **unit_fields(unit),
                area=unit.box,
                seed=int(rng.integers(2**63)),
                count=changed + steady,
                change=change,
                changed=changed,
                steady=steady,
                side=("left", "right")[rng.integers(2)],
                position=("upper", "lower")[rng.integers(2)],
                # a lesion that grows or shrinks is placed at its larger size
                size="large" if change in ("grown", "shrunk") else ("small", "large")[rng.integers(2)],
                contrast=("bright", "dark")[rng.integers(2)],
            )
        )
    return specs


def jitter_augment(augment: dict, rng: np.random.Generator) -> dict:
    """The current study's augmentation: the prior's crop and flips, its window and gamma slightly moved, and
    noise of its own (sigma and seed)."""
    return dict(
        augment,
        window=[round(w + rng.uniform(-WINDOW_JITTER, WINDOW_JITTER), 2) for w in augment["window"]],
        gamma=round(augment["gamma"] * math.exp(rng.uniform(-GAMMA_JITTER, GAMMA_JITTER)), 4),
        noise=round(rng.uniform(*NOISE_SIGMA), 2),
        noise_seed=int(rng.integers(2**31)),
    )


def study_dates(rng: np.random.Generator) -> tuple[str, str]:
    prior = FIRST_DATE + datetime.timedelta(days=int(rng.integers(PRIOR_SPREAD_DAYS)))
    current = prior + datetime.timedelta(days=int(rng.integers(INTERVAL_DAYS[0], INTERVAL_DAYS[1] + 1)))
    return prior.isoformat(), current.isoformat()


def lesion_tracks(spec: PairSpec, ellipses: list[tuple], rng: np.random.Generator) -> list[dict]:
    """Each placed site's geometry on the prior and the current study (None where it is absent) and its status.
    The first `spec.changed` sites carry the pair's change, the others are unchanged."""
    tracks = []
    for n, (cx, cy, rx, ry, angle) in enumerate(ellipses):
        status = spec.change if n < spec.changed else "unchanged"
        f = rng.uniform(*GROWTH)
        # rounded as stored, so the drawn geometry is exactly the recorded one
        big = tuple(round(float(v), 3) for v in (cx, cy, rx, ry, angle))
        small = tuple(round(float(v), 3) for v in (cx, cy, rx * f, ry * f, angle))
        prior, current = {
            "new": (None, big),
            "resolved": (big, None),
            "grown": (small, big),
            "shrunk": (big, small),
            "unchanged": (big, big),
        }[status]
        tracks.append(dict(status=status, prior=prior, current=current))
    return tracks


def _geometry(ellipse: tuple | None, contrast: float | None) -> dict | None:
    if ellipse is None:
        return None
    cx, cy, rx, ry, angle = ellipse
    return dict(
        cx=cx,
        cy=cy,
        rx=rx,
        ry=ry,
        angle=angle,
        area=round(math.pi * rx * ry, 2),
        measured_contrast=round(contrast, 1),
    )


def render_pair(spec: PairSpec, background: np.ndarray, size: int):
    """(prior image, current image, truth). Deterministic in (spec, background, size).

    Tries fresh crops until every lesion fits and shows on each study it is on: first with the requested
    contrast on tissue, then also with the other contrast, last anywhere in the quadrant (as `findings.render`)."""
    source = SOURCE_BY_KEY[spec.source]
    rng = np.random.default_rng(spec.seed)
    other = "dark" if spec.contrast == "bright" else "bright"
    dates = study_dates(rng)
    for attempt in range(ATTEMPTS):
        prior_aug = sample_augment(background, source, rng)
        current_aug = jitter_augment(prior_aug, rng)
        arrays = [apply_augment(background, size, a) for a in (prior_aug, current_aug)]
        for contrast in (spec.contrast,) if attempt < 8 else (spec.contrast, other):
            tissue = attempt < 3 * ATTEMPTS // 4
            ellipses = _place(_luminance(arrays[0]), spec, contrast, rng, tissue=tissue)
            if ellipses is None:
                continue
            tracks = lesion_tracks(spec, ellipses, rng)
            images, measured = [], {}
            for array, augment, when in zip(
                arrays, (prior_aug, current_aug), ("prior", "current"), strict=True
            ):
                shown = [n for n, t in enumerate(tracks) if t[when] is not None]
                drawn = [tracks[n][when] for n in shown]
                images.append(_to_image(add_noise(_draw(array, drawn, contrast, rng), augment)))
                values = measured_contrasts(images[-1], drawn, size) if drawn else []
                measured[when] = dict(zip(shown, values, strict=True))
            if min(v for by_lesion in measured.values() for v in by_lesion.values()) < MIN_CONTRAST:
                continue
            truth = dict(
                contrast=contrast,
                prior=dict(date=dates[0], augment=prior_aug),
                current=dict(date=dates[1], augment=current_aug),
                lesions=[
                    dict(
                        status=t["status"],
                        prior=_geometry(t["prior"], measured["prior"].get(n)),
                        current=_geometry(t["current"], measured["current"].get(n)),
                    )
                    for n, t in enumerate(tracks)
                ],
            )
            return images[0], images[1], truth
    raise RuntimeError(
        f"{spec.id}: no visible placement of {spec.count} {spec.size} lesion(s) ({spec.change}) in the "
        f"{spec.position} {spec.side} quadrant of {spec.unit} on both studies after {ATTEMPTS} crops"
    )


def render_pair_job(
    spec: PairSpec, background: np.ndarray, out_dir: Path, size: int, file_label: str
) -> dict:
    """Render one pair, save its two PNGs under out_dir/images/ and return its ground truth (one instance line)."""
    prior, current, truth = render_pair(spec, background, size)
    stem = image_stem(spec.id)
    names = {}
    for when, image in (("prior", prior), ("current", current)):
        names[when] = f"images/{stem}-{when}.png"
        image.save(Path(out_dir) / names[when], format="PNG")
    lesions = truth["lesions"]
    return dict(
        instance_head(spec, FAMILY, file_label),
        area=list(spec.area),
        modality=spec.modality,
        region=spec.region,
        image_size=size,
        change=spec.change,
        new_count=sum(les["status"] == "new" for les in lesions),
        side=spec.side,
        position=spec.position,
        size=spec.size,
        contrast=truth["contrast"],
        prior=dict(image=names["prior"], **truth["prior"]),
        current=dict(image=names["current"], **truth["current"]),
        lesions=lesions,
    )


# --- questions and rows -------------------------------------------------------------------------------------


QUESTIONS = (
    MultiQuestion(
        "CHANGE",
        OPEN,
        (
            "What changed since the prior study?",
            "Compared with the prior study, what changed: new, grown, shrunk, resolved or unchanged?",
        ),
        0.3,
    ),
    MultiQuestion(
        "NEW",
        CLOSED,
        ("Is there a new lesion on the current study?", "Has a new lesion appeared since the prior study?"),
        0.25,
    ),
    MultiQuestion(
        "NEW_COUNT",
        OPEN,
        ("How many new lesions are there?", "How many lesions are new since the prior study?"),
        0.2,
    ),
    MultiQuestion(
        "GROWN",
        CLOSED,
        ("Has the lesion grown since the prior study?", "Is the lesion larger than on the prior study?"),
        0.25,
    ),
)


def single_tracked(pair: dict) -> bool:
    """One lesion in all, on both studies: "Has the lesion grown?" has one lesion to be about."""
    lesions = pair["lesions"]
    return len(lesions) == 1 and lesions[0]["prior"] is not None and lesions[0]["current"] is not None


def new_statement(n: int) -> str:
    if n == 0:
        return "There is no new lesion on the current study."
    return (
        f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} new {plural('lesion', n)} on the current study."
    )


GROWN_STATEMENT = {
    "grown": "The lesion has grown since the prior study.",
    "shrunk": "The lesion has shrunk since the prior study.",
    "unchanged": "The lesion is unchanged since the prior study.",
}


def ask_pair(kind: MultiQuestion, pair: dict, rnd: random.Random) -> dict | None:
    """A candidate question about a pair (`common_rows.candidate`), or None when the kind does not apply."""
    if kind.question_type == "GROWN" and not single_tracked(pair):
        return None
    if kind.question_type == "CHANGE":
        answer, statement = pair["change"], None
    elif kind.question_type == "NEW":
        answer, statement = ("yes" if pair["new_count"] else "no"), new_statement(pair["new_count"])
    elif kind.question_type == "NEW_COUNT":
        answer, statement = str(pair["new_count"]), None
    else:
        status = pair["lesions"][0]["status"]
        answer, statement = ("yes" if status == "grown" else "no"), GROWN_STATEMENT[status]
    return candidate(kind, pair, rnd, answer, statement)


def select_questions(pairs: Sequence[dict], n: int, rnd: random.Random) -> list[dict]:
    """n questions in the kinds' shares, answers balanced within each kind (`questions.balanced_pick`); a kind
    short of candidates leaves its rows to the others."""
    return select_vqa(pairs, n, rnd, QUESTIONS, candidate=ask_pair)


def role_inputs(pair: dict) -> list[ImageInput]:
    return [ImageInput(role=when, date=pair[when]["date"]) for when in ("prior", "current")]


def image_roles(pair: dict) -> list[dict]:
    return [{"role": when, "date": pair[when]["date"]} for when in ("prior", "current")]


def pair_rows(picked: Sequence[dict], split: str) -> list[dict]:
    """VQA rows (`common_rows.multi_image_rows`): the prior then the current image, `image_roles` with their
    dates, the role line of `medllava.image_roles` before the question; CLOSED answers stated ("There is no new
    lesion on the current study. No."), OPEN ones the canonical phrase."""
    return multi_image_rows(
        picked,
        split,
        "long",
        images=lambda pair: [pair["prior"]["image"], pair["current"]["image"]],
        inputs=role_inputs,
        roles=image_roles,
    )
