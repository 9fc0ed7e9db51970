"""The words of medsynth: names shared by every module, canonical answers (lowercase, short) and the phrases
that sentences about an image are made of."""

from __future__ import annotations

import random

SOURCE_NAME = "medsynth"
SPLITS = ("train", "val", "test")
STAGES = ("captions", "instruct", "vqa", "grpo")

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
    lesion {ref}="the nodule", {be}="is", {Be}="Is", {does}="does", {it}="it" (two: "the nodules", "are",
    "Are", "do", "them"). Draws one choice from `rnd`."""
    noun = rnd.choice(NOUNS)
    one = inst["count"] == 1
    be = "is" if one else "are"
    return dict(
        ref=f"the {noun}" if one else f"the {noun}s",
        be=be,
        Be=cap(be),
        does="does" if one else "do",
        it="it" if one else "them",
    )
