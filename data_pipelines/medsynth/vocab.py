"""The words of medsynth: names shared by every module, canonical answers (lowercase, short) and the phrases
that sentences about an image are made of."""

from __future__ import annotations

import random

SOURCE_NAME = "medsynth"
# train/val/test share source files (cut into slices, frames or regions that never meet); `unseen` holds the
# images of whole source files (or volumes) that no other split was cut from.
IN_DOMAIN = ("train", "val", "test")
UNSEEN = "unseen"
SPLITS = (*IN_DOMAIN, UNSEEN)
STAGES = ("captions", "instruct", "vqa", "grpo")
# How a CLOSED question is answered: "stated" (the finding it asks about, then the verdict: "This is an MRI image.
# No.") or "verdict" (the bare "yes"/"no"). `medllava.prompts.extract_answer` gives the verdict of either.
CLOSED_ANSWERS = ("stated", "verdict")

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound", "nuclear medicine", "fundus photograph", "histology")
MODALITY_PHRASE = {
    "CT": "a CT image",
    "MRI": "an MRI image",
    "X-ray": "an X-ray",
    "ultrasound": "an ultrasound image",
    "nuclear medicine": "a nuclear medicine scan",
    "fundus photograph": "a fundus photograph",
    "histology": "a histology image",
}
MODALITY_ASKED = {  # noun phrases for closed questions "Is this ...?"
    "CT": ("a CT scan", "a CT image", "a computed tomography image"),
    "MRI": ("an MRI scan", "an MR image", "a magnetic resonance image"),
    "X-ray": ("an X-ray", "a radiograph", "a plain X-ray image"),
    "ultrasound": ("an ultrasound image", "a sonogram", "an ultrasound scan"),
    "nuclear medicine": ("a nuclear medicine scan", "a scintigram", "a nuclear medicine image"),
    "fundus photograph": ("a fundus photograph", "a retinal photograph", "a fundus image"),
    "histology": ("a histology image", "a microscopy image of tissue", "a histological slide"),
}
REGION_PHRASE = {
    "head": "the head",
    "spine": "the spine",
    "abdomen": "the abdomen",
    "shoulder": "the shoulder",
    "chest": "the chest",
    "leg": "the leg",
    "lymph node": "a lymph node",
    "heart": "the heart",
    "pelvis": "the pelvis",
    "whole body": "the whole body",
    "eye": "the retina",
    "colon": "colon tissue",
    "skin": "skin tissue",
}
CONTRAST_TERMS = {  # modality-specific words for captions and conversations; VQA answers stay "brighter"/"darker"
    "CT": ("hyperdense", "hypodense"),
    "MRI": ("hyperintense", "hypointense"),
    "ultrasound": ("hyperechoic", "hypoechoic"),
    "X-ray": ("radiopaque", "radiolucent"),
    "nuclear medicine": ("hot", "photopenic"),
}
COUNT_WORDS = {0: "no", 1: "one", 2: "two", 3: "three"}
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
NOUNS = ("lesion", "focal lesion", "nodule")


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def yes(condition) -> str:
    return "yes" if condition else "no"


def quadrant(inst: dict) -> str:
    return f"{inst['position']} {inst['side']}"


def study_phrase(inst: dict) -> str:
    return f"{MODALITY_PHRASE[inst['modality']]} of {REGION_PHRASE[inst['region']]}"


def contrast_answer(inst: dict) -> str:
    """The lesions' contrast as a VQA answer: "brighter" or "darker"."""
    return "brighter" if inst["contrast"] == "bright" else "darker"


def lesion_ref(inst: dict, rnd: random.Random) -> dict[str, str]:
    """How a question names the image's lesions, with a random synonym: fields for str.format, e.g. for one
    lesion {ref}="the nodule", {Ref}="The nodule", {be}="is", {Be}="Is", {does}="does", {Does}="Does",
    {it}="it", {its}="its" (two: "the nodules", "The nodules", "are", "Are", "do", "Do", "them", "their").
    Draws one choice from `rnd`."""
    noun = rnd.choice(NOUNS)
    one = inst["count"] == 1
    be = "is" if one else "are"
    does = "does" if one else "do"
    ref = f"the {noun}" if one else f"the {noun}s"
    return dict(
        ref=ref,
        Ref=cap(ref),
        be=be,
        Be=cap(be),
        does=does,
        Does=cap(does),
        it="it" if one else "them",
        its="its" if one else "their",
    )


def lesions_phrase(count: int) -> str:
    """ "no lesion", "one lesion", "two lesions"."""
    return f"{COUNT_WORDS[count]} {plural('lesion', count)}" if count else "no lesion"


def finding_fields(inst: dict) -> dict[str, str]:
    """The image's ground truth as str.format fields for the statements of stated closed answers (see
    `questions.QuestionKind.statement`): {modality} "an MRI image", {region} "the head", {is} "is"/"are",
    {lesions} "no lesion"/"two lesions", {where} "" or " in the upper left of the image", and with lesions
    {side} {position} {size} and {contrast} ("brighter"/"darker")."""
    n = inst["count"]
    fields = dict(
        modality=MODALITY_PHRASE[inst["modality"]],
        region=REGION_PHRASE[inst["region"]],
        lesions=lesions_phrase(n),
        where=f" in the {quadrant(inst)} of the image" if n else "",
        **{"is": "are" if n > 1 else "is"},
    )
    if n:
        fields.update(
            side=inst["side"], position=inst["position"], size=inst["size"], contrast=contrast_answer(inst)
        )
    return fields


def facts(inst: dict) -> dict:
    """The facts a description of the image should state, machine-readable (the `facts` field of caption and
    conversation rows): modality, region, lesion_count and, with lesions, side, position, quadrant, size,
    contrast ("bright"/"dark"; captions may say "hyperdense", "hypointense", ... see CONTRAST_TERMS)."""
    out = {"modality": inst["modality"], "region": inst["region"], "lesion_count": inst["count"]}
    if inst["count"]:
        out.update(
            side=inst["side"],
            position=inst["position"],
            quadrant=quadrant(inst),
            size=inst["size"],
            contrast=inst["contrast"],
        )
    return out
