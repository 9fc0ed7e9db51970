"""The README written next to the data: what this build produced (rows, images per modality, background
sources, lesions, question and answer balance, CHOICE letters) and how guessable its VQA is from the
question text alone."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from data_pipelines.common import format_table
from data_pipelines.medsynth.backgrounds import PACKAGE_LICENCE, SOURCES, Unit
from data_pipelines.medsynth.vocab import SPLITS, STAGES, UNSEEN
from medllava.schema import normalise_text, vqa_answer, vqa_question


def short_answer(row: dict) -> str:
    """The canonical answer of a VQA row (its verdict, for a stated CLOSED answer)."""
    return row.get("short_answer") or vqa_answer(row)


def text_only_baseline(train: Sequence[dict], test: Sequence[dict]) -> dict[str, float]:
    """Accuracy of answering test VQA from the question text alone (the train majority answer of the same
    question, else of the same question type and answer type): how guessable the set is without the image."""
    by_question, by_type = defaultdict(Counter), defaultdict(Counter)
    for row in train:
        by_question[normalise_text(vqa_question(row))][short_answer(row)] += 1
        by_type[(row["question_type"], row["answer_type"])][short_answer(row)] += 1
    hits = Counter()
    for row in test:
        votes = by_question.get(normalise_text(vqa_question(row))) or by_type.get(
            (row["question_type"], row["answer_type"]), Counter({"": 1})
        )
        hits[row["answer_type"], "n"] += 1
        hits[row["answer_type"], "hit"] += votes.most_common(1)[0][0] == short_answer(row)
    return {t: hits[t, "hit"] / hits[t, "n"] for t in ("CLOSED", "OPEN") if hits[t, "n"]}


def readme(args, rows: dict, instances: dict, units: Sequence[Unit], notes: Sequence[str]) -> str:
    lines = [
        "# medsynth: a synthetic-finding medical VQA starter set on real images",
        "",
        f"Built by `python -m data_pipelines.medsynth --out DIR --seed {args.seed} --size {args.size} "
        f"--image-size {args.image_size} --closed-answers {args.closed_answers}"
        + (f" --train-images {args.train_images}" if getattr(args, "train_images", None) is not None else "")
        + "`; the same command rebuilds these "
        "files byte for byte.",
        "",
        "Backgrounds are real images shipped by "
        + ", ".join(sorted({s.package for s in SOURCES if units_of(units, s.key)}))
        + "; the lesions are synthetic and are the only findings labelled. Some backgrounds carry real, "
        "unlabelled abnormality (the 693 head CT shows subdural collections). Left/right always means the "
        "left/right of the IMAGE as displayed (the viewer's left), not the patient's side. "
        "`instances_<split>.jsonl` holds the ground truth of every image (source slice and area; augmentation: "
        "crop, flips, intensity window, gamma, noise; each lesion's centre and radii in pixels). A background "
        "unit (a slice or frame of a file, or a region of its picture) belongs to one split; regions of one file "
        "do not overlap and are separated by a gap. The `unseen` split's images come from whole files (or "
        "volumes) that no train, val or test image was cut from.",
        "",
        "CLOSED VQA answers are "
        + (
            "stated: the finding the question asks about, then the verdict (`There is no lesion. No.`); "
            "`medllava.prompts.extract_answer` gives the verdict"
            if args.closed_answers == "stated"
            else "the bare verdict (`yes` / `no`)"
        )
        + ". Every VQA row's `short_answer` is its canonical short answer; caption and conversation rows carry "
        "`facts` (modality, region, lesion_count and, with lesions, side, position, quadrant, size, contrast).",
        "",
        "## Rows per split",
        "",
    ]
    lines.append(rows_table(rows, instances))
    lines += ["", "## Images per modality and split (background units in brackets)", ""]
    unit_count = Counter((u.split, u.modality) for u in units)
    modalities = sorted({inst["modality"] for s in SPLITS for inst in instances[s]})
    lines.append(
        format_table(
            ["modality", *SPLITS],
            [
                [
                    m,
                    *(
                        f"{sum(i['modality'] == m for i in instances[s])} ({unit_count[s, m]})"
                        for s in SPLITS
                    ),
                ]
                for m in modalities
            ],
        )
    )
    lines += ["", "## Background sources", ""]
    per_source = Counter((u.source, u.split) for u in units)
    lines.append(
        format_table(
            ["source", "file", "modality", "region", *(f"{s} units" for s in SPLITS)],
            [
                [
                    s.key,
                    f"{s.package}: {s.relpath}",
                    units_of(units, s.key)[0].modality,
                    units_of(units, s.key)[0].region,
                    *(per_source[s.key, sp] for sp in SPLITS),
                ]
                for s in SOURCES
                if units_of(units, s.key)
            ],
        )
    )
    lines += ["", "## Held out whole for the unseen split, per modality", ""]
    unseen = defaultdict(list)
    for s in SOURCES:
        if s.split == UNSEEN and units_of(units, s.key):
            unseen[s.modality].append(f"{s.key} ({s.package}: {s.relpath})")
    lines.append(
        format_table(
            ["modality", "unseen sources"],
            [[m, "; ".join(unseen[m]) or "none (one file only)"] for m in modalities],
        )
    )
    packages = sorted({s.package for s in SOURCES if units_of(units, s.key)})
    lines += ["", "## Licences of the packages used", ""]
    lines.append(format_table(["package", "licence"], [[p, PACKAGE_LICENCE[p]] for p in packages]))
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    lines += ["", "## Lesions per image", ""]
    lines.append(
        format_table(
            ["lesions", *SPLITS],
            [[n, *(sum(i["count"] == n for i in instances[s]) for s in SPLITS)] for n in range(4)],
        )
    )
    lines += ["", "## VQA rows per question type and answer type", ""]
    qtypes = sorted({r["question_type"] for s in SPLITS for r in rows["vqa"][s]})
    lines.append(
        format_table(
            ["question_type", *(f"{s} {t}" for s in SPLITS for t in ("OPEN", "CLOSED"))],
            [
                [
                    q,
                    *(
                        sum(r["question_type"] == q and r["answer_type"] == t for r in rows["vqa"][s])
                        for s in SPLITS
                        for t in ("OPEN", "CLOSED")
                    ),
                ]
                for q in qtypes
            ],
        )
    )
    lines += ["", "## MODALITY questions per modality (OPEN + CLOSED)", ""]
    lines.append(
        format_table(
            ["modality", *SPLITS],
            [
                [
                    m,
                    *(
                        sum(r["question_type"] == "MODALITY" and r["modality"] == m for r in rows["vqa"][s])
                        for s in SPLITS
                    ),
                ]
                for m in modalities
            ],
        )
    )
    lines += ["", "## CLOSED answers (yes / no) per question type", ""]
    lines.append(
        format_table(
            ["question_type", *SPLITS],
            [
                [
                    q,
                    *(
                        "{} / {}".format(
                            *(
                                sum(
                                    r["question_type"] == q
                                    and r["answer_type"] == "CLOSED"
                                    and short_answer(r) == a
                                    for r in rows["vqa"][s]
                                )
                                for a in ("yes", "no")
                            )
                        )
                        for s in SPLITS
                    ),
                ]
                for q in qtypes
            ],
        )
    )
    lines += ["", "## OPEN answers per split", ""]
    open_answers = defaultdict(Counter)
    for s in SPLITS:
        for r in rows["vqa"][s]:
            if r["answer_type"] == "OPEN":
                open_answers[r["question_type"], short_answer(r)][s] += 1
    lines.append(
        format_table(
            ["question_type", "answer", *SPLITS],
            [[q, a, *(open_answers[q, a][s] for s in SPLITS)] for q, a in sorted(open_answers)],
        )
    )
    lines += ["", "## GRPO rows per answer type (CHOICE letters in brackets)", ""]
    lines.append(
        format_table(
            ["split", "OPEN", "CLOSED", "CHOICE"],
            [
                [
                    s,
                    *(sum(r["answer_type"] == t for r in rows["grpo"][s]) for t in ("OPEN", "CLOSED")),
                    "{} ({})".format(
                        sum(r["answer_type"] == "CHOICE" for r in rows["grpo"][s]),
                        " ".join(
                            f"{k}:{v}"
                            for k, v in sorted(
                                Counter(
                                    r["solution"] for r in rows["grpo"][s] if r["answer_type"] == "CHOICE"
                                ).items()
                            )
                        ),
                    ),
                ]
                for s in SPLITS
            ],
        )
    )
    baseline = text_only_baseline(rows["vqa"]["train"], rows["vqa"]["test"])
    lines += [
        "",
        "## Question text alone (no image)",
        "",
        "Test VQA accuracy of answering with the most frequent train answer of the same question text: "
        + ", ".join(f"{t} {v:.1%}" for t, v in baseline.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def rows_table(rows: dict, instances: dict) -> str:
    return format_table(
        ["file", *SPLITS],
        [[f"{stage}_<split>.jsonl", *(len(rows[stage][s]) for s in SPLITS)] for stage in STAGES]
        + [["images", *(len(instances[s]) for s in SPLITS)]],
    )


def units_of(units: Sequence[Unit], key: str) -> list[Unit]:
    return [u for u in units if u.source == key]
