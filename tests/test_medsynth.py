"""medsynth: deterministic, leak-free across splits (no shared slice, no overlapping region, unseen files held out
whole), every modality in train/val/test, balanced, valid schema rows, answers (stated findings included) and
descriptions that match the pixels.

Two small builds (--size 0.03, ~70 images each) are made once per module: one in-process, one through the
command line (`python -m data_pipelines.medsynth`) with 2 workers. Both must match, byte for byte, the sha256
manifest in tests/fixtures/medsynth_manifest.json (regenerate it with `python tests/test_medsynth.py` after an
intended change of the output, and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import medsynth as ms
from medllava.prompts import extract_answer, stated_answer
from medllava.schema import read_rows, validate_row, vqa_answer, vqa_question

SIZE = "0.03"
REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests" / "fixtures" / "medsynth_manifest.json"


def _build(out: Path, seed: int, workers: int, *extra: str) -> Path:
    args = ["--out", str(out), "--seed", str(seed), "--size", SIZE, "--num-workers", str(workers), *extra]
    ms.build(ms.parse_args(args))
    return out


def _build_cli(out: Path, seed: int, workers: int) -> Path:
    args = ["--out", str(out), "--seed", str(seed), "--size", SIZE, "--num-workers", str(workers)]
    done = subprocess.run(
        [sys.executable, "-m", "data_pipelines.medsynth", *args], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("medsynth")
    return _build(root / "a", 3, 1), _build_cli(root / "b", 3, 2)


@pytest.fixture(scope="module")
def out(built):
    return built[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _instances(out: Path) -> dict[str, dict]:
    return {i["id"]: i for split in ms.SPLITS for i in read_rows(out / f"instances_{split}.jsonl")}


def _rows(out: Path, stage: str, split: str) -> list[dict]:
    return read_rows(out / f"{stage}_{split}.jsonl")


# --- determinism ---------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_worker_count(built):
    a, b = built
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(f.endswith(".png") for f in files_a) and "README.md" in files_a
    different = [f for f in files_a if _digest(a / f) != _digest(b / f)]
    assert different == []


def test_build_matches_the_committed_manifest(built):
    """Every file of the seed-3 build (every JSONL, PNG and the README) has the sha256 recorded in the manifest:
    a changed wording, order of random draws, lesion pixel or README line fails here."""
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    assert manifest["args"] == ["--seed", "3", "--size", SIZE]  # the build of the `built` fixture
    out = built[0]
    files = {p.relative_to(out).as_posix(): _digest(p) for p in out.rglob("*") if p.is_file()}
    assert sorted(files) == sorted(manifest["files"])
    changed = sorted(f for f, digest in files.items() if digest != manifest["files"][f])
    assert changed == []


def test_different_seeds_give_different_instances():
    units, _, _ = ms.catalogue()
    one, two = (ms.sample_specs(units, "train", 30, seed) for seed in (0, 1))
    assert [s.seed for s in one] != [s.seed for s in two]
    assert ms.sample_specs(units, "train", 30, 0) == one


def test_existing_build_is_not_overwritten_silently(out):
    with pytest.raises(SystemExit, match="--overwrite"):
        ms.build(ms.parse_args(["--out", str(out), "--size", SIZE]))


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        ms.parse_args(["--out", "x", "--size", "0"])
    with pytest.raises(SystemExit):
        ms.parse_args(["--out", "x", "--image-size", "64"])
    with pytest.raises(SystemExit):
        ms.parse_args(["--out", "x", "--closed-answers", "maybe"])
    assert ms.parse_args(["--out", "x"]).closed_answers == "stated"


def test_train_images_sets_the_train_count_and_keeps_rows_per_image():
    from data_pipelines.medsynth.builder import n_images, n_rows

    default = ms.parse_args(["--out", "x"])
    assert n_images("train", default) == 1500 and n_rows("vqa", "train", default) == 12000
    more = ms.parse_args(["--out", "x", "--train-images", "3000", "--size", "0.5"])
    assert n_images("train", more) == 3000 and n_rows("vqa", "train", more) == 24000
    assert n_images("test", more) == 140 and n_rows("vqa", "test", more) == 300
    with pytest.raises(SystemExit):
        ms.parse_args(["--out", "x", "--train-images", "3"])


def test_verdict_only_build_differs_only_in_closed_vqa_answers(built, tmp_path):
    """--closed-answers verdict (the ablation): the same images, instances, captions, conversations, GRPO rows and
    VQA questions; only the CLOSED VQA answers (bare verdicts) and the README's build line change."""
    stated = built[0]
    verdict = _build(tmp_path / "verdict", 3, 1, "--closed-answers", "verdict")
    files = sorted(p.relative_to(stated).as_posix() for p in stated.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(verdict).as_posix() for p in verdict.rglob("*") if p.is_file())
    changed = {f for f in files if _digest(stated / f) != _digest(verdict / f)}
    assert changed == {"README.md", *(f"vqa_{split}.jsonl" for split in ms.SPLITS)}
    for split in ms.SPLITS:
        rows_s, rows_v = _rows(stated, "vqa", split), _rows(verdict, "vqa", split)
        assert [vqa_question(r) for r in rows_s] == [vqa_question(r) for r in rows_v]
        for a, b in zip(rows_s, rows_v, strict=True):
            assert a["short_answer"] == b["short_answer"] == vqa_answer(b)
            if a["answer_type"] == "CLOSED":
                assert vqa_answer(a) != vqa_answer(b) and extract_answer(vqa_answer(a)).lower() == vqa_answer(
                    b
                )
            else:
                assert vqa_answer(a) == vqa_answer(b)


# --- splits: no background slice and no instance in two splits --------------------------------------------------------


def test_catalogue_assigns_each_slice_to_one_split_with_guards():
    units, files, _ = ms.catalogue()
    keys = [u.key for u in units]
    assert len(keys) == len(set(keys))
    assert {u.split for u in units} == set(ms.SPLITS)
    for source in ms.SOURCES:
        if source.split != "blocks" or source.key not in files:
            continue
        split_of = {u.index: u.split for u in units if u.source == source.key}
        # neighbouring slices (in the source's order) never sit in two different splits
        for prev, nxt in zip(source.units, source.units[1:], strict=False):
            if prev in split_of and nxt in split_of:
                assert split_of[prev] == split_of[nxt], (source.key, prev, nxt)


def test_regions_of_different_splits_do_not_overlap_in_source_pixels():
    """A cut file: its regions of different splits, in the file's own pixels, are disjoint with a gap of at least
    2% of the imaging area's shorter side between them; each one lies inside the file's imaging area (roi)."""
    from medllava.processing import load_image

    units, files, _ = ms.catalogue()
    cut = [s for s in ms.SOURCES if s.split == "regions" and s.key in files]
    assert {s.modality for s in cut} >= {"X-ray", "nuclear medicine", "fundus photograph", "histology"}
    for source in cut:
        size = load_image(files[source.key]).size  # (width, height) of the file's picture
        roi = ms.pixel_box(source.roi, size)
        boxes = {u.key: (u.split, ms.pixel_box(u.box, size)) for u in units if u.source == source.key}
        assert {split for split, _ in boxes.values()} == set(ms.IN_DOMAIN), source.key
        for split, (x0, y0, x1, y1) in boxes.values():
            assert roi[0] <= x0 < x1 <= roi[2] and roi[1] <= y0 < y1 <= roi[3], (source.key, split)
        gap = max(4.0, 0.02 * min(roi[2] - roi[0], roi[3] - roi[1]))
        items = sorted(boxes.values())
        for i, (split_a, a) in enumerate(items):
            for split_b, b in items[i + 1 :]:
                if split_a == split_b:
                    continue
                dx = max(b[0] - a[2], a[0] - b[2])  # > 0: apart along x (pixels between them)
                dy = max(b[1] - a[3], a[1] - b[3])
                assert max(dx, dy) >= gap, (source.key, split_a, a, split_b, b)
        # the background of a region is cut from exactly its box, nothing around it
        for unit in (u for u in units if u.source == source.key):
            background = ms.load_background((unit, str(files[source.key])))
            x0, y0, x1, y1 = ms.pixel_box(unit.box, size)
            scale = max(1.0, min(x1 - x0, y1 - y0) / ms.BACKGROUND_SIDE)
            assert (
                abs(background.shape[1] - (x1 - x0) / scale) <= 1
                and abs(background.shape[0] - (y1 - y0) / scale) <= 1
            ), (unit.key, background.shape)


def test_every_modality_has_background_units_in_every_split():
    units, _, _ = ms.catalogue()
    for split in ms.IN_DOMAIN:
        assert {u.modality for u in units if u.split == split} == set(ms.MODALITIES), split


def test_unseen_split_holds_whole_files_no_other_split_was_cut_from():
    """Every source with an unseen unit has all its units in `unseen`; a modality with more than one file holds
    at least one out (CT, MRI, ultrasound, histology), and every unseen modality is also in train."""
    units, files, _ = ms.catalogue()
    splits_of = defaultdict(set)
    for u in units:
        splits_of[u.source].add(u.split)
    unseen = {src for src, splits in splits_of.items() if ms.UNSEEN in splits}
    assert unseen and all(splits_of[src] == {ms.UNSEEN} for src in unseen)
    assert {ms.SOURCE_BY_KEY[src].split for src in unseen} == {ms.UNSEEN}
    # no two sources are the same file
    assert len({(s.package, s.relpath) for s in ms.SOURCES}) == len(ms.SOURCES)
    files_per_modality = Counter(s.modality for s in ms.SOURCES if s.key in files)
    unseen_modalities = {ms.SOURCE_BY_KEY[src].modality for src in unseen}
    assert unseen_modalities == {m for m, n in files_per_modality.items() if n > 1}
    assert unseen_modalities == {"CT", "MRI", "ultrasound", "histology"}
    train_modalities = {u.modality for u in units if u.split == "train"}
    assert unseen_modalities <= train_modalities


def test_default_test_split_asks_each_modality_at_least_20_times():
    """The default test split (280 images, 600 VQA rows): >= 20 MODALITY questions per modality, yes/no balanced.
    Instances are the sampled specs (labels only; no rendering needed to pick questions)."""
    import random

    units, _, _ = ms.catalogue()
    n_images, n_vqa = ms.DEFAULT_INSTANCES["test"], ms.DEFAULT_ROWS["vqa"]["test"]
    instances = [
        {
            "id": spec.id,
            "image": f"images/{spec.id}.png",
            "modality": spec.modality,
            "region": spec.region,
            "count": spec.count,
            "side": spec.side,
            "position": spec.position,
            "size": spec.size,
            "contrast": spec.contrast,
        }
        for spec in ms.sample_specs(units, "test", n_images, 0)
    ]
    picked = ms.select_vqa(instances, n_vqa, random.Random("0/test/vqa"), ms.vqa_table("test"))
    assert len(picked) == n_vqa
    modality = [c for c in picked if c["question_type"] == "MODALITY"]
    per_modality = Counter(c["instance"]["modality"] for c in modality)
    assert set(per_modality) == set(ms.MODALITIES) and min(per_modality.values()) >= 20, per_modality
    closed = Counter(c["answer"] for c in modality if c["answer_type"] == "CLOSED")
    assert abs(closed["yes"] - closed["no"]) <= 1, closed


def test_default_unseen_split_asks_each_of_its_modalities_at_least_20_times():
    import random

    units, _, _ = ms.catalogue()
    specs = ms.sample_specs(units, ms.UNSEEN, ms.DEFAULT_INSTANCES[ms.UNSEEN], 0)
    instances = [
        {
            "id": s.id,
            "image": s.id,
            "modality": s.modality,
            "region": s.region,
            "count": s.count,
            "side": s.side,
        }
        | {"position": s.position, "size": s.size, "contrast": s.contrast}
        for s in specs
    ]
    n_vqa = ms.DEFAULT_ROWS["vqa"][ms.UNSEEN]
    picked = ms.select_vqa(instances, n_vqa, random.Random("0/unseen/vqa"), ms.vqa_table(ms.UNSEEN))
    per_modality = Counter(c["instance"]["modality"] for c in picked if c["question_type"] == "MODALITY")
    assert set(per_modality) == {"CT", "MRI", "ultrasound", "histology"} and min(per_modality.values()) >= 20


def test_modality_and_region_come_from_tags_where_present():
    units, _, _ = ms.catalogue()
    by_source = {u.source: u for u in units}
    assert by_source["ct-head-lv2"].region == "head"  # BodyPartExamined HEAD
    assert by_source["ct-abdomen"].region == "abdomen"  # BodyPartExamined PANCREAS
    assert by_source["xr-leg"].region == "leg"  # StudyDescription "...distal tibia"
    assert by_source["us-heart-tee"].region == "heart"  # StudyDescription Echocardiogram
    assert by_source["mr-shoulder"].modality == "MRI"  # Modality MR
    assert ms.region_from_tags({"BodyPartExamined": "CHEST"}) == "chest"
    assert ms.region_from_tags({"StudyDescription": "e+1"}) is None


def test_sources_are_distinct_images():
    """Different catalogue entries are not the same picture in another encoding (perceptual hash)."""
    import imagehash

    units, files, _ = ms.catalogue()
    first = {}
    for u in units:
        first.setdefault(u.source, u)
    hashes = {
        key: imagehash.phash(Image.fromarray(ms.load_background((u, str(files[u.source])))))
        for key, u in first.items()
    }
    keys = sorted(hashes)
    close = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if hashes[a] - hashes[b] <= 8]
    assert close == []


def test_every_modality_is_in_every_split_and_crops_stay_in_their_area(out):
    instances = _instances(out)
    units = {u.key: u for u in ms.catalogue()[0]}
    for split in ms.IN_DOMAIN:
        insts = [i for i in instances.values() if i["split"] == split]
        assert {i["modality"] for i in insts} == set(ms.MODALITIES), split
    unseen = [i for i in instances.values() if i["split"] == ms.UNSEEN]
    assert {i["modality"] for i in unseen} == {"CT", "MRI", "ultrasound", "histology"}
    assert all(ms.SOURCE_BY_KEY[i["source"]].split == ms.UNSEEN for i in unseen)
    for inst in instances.values():
        unit = units[inst["unit"]]
        assert unit.split == inst["split"] and inst["area"] == list(unit.box), inst["id"]
    # the crop (in background pixels) lies inside the background, which is the unit's area and nothing more
    files = ms.catalogue()[1]
    shapes = {}
    for inst in instances.values():
        unit = units[inst["unit"]]
        if unit.key not in shapes:
            shapes[unit.key] = ms.load_background((unit, str(files[unit.source]))).shape[:2]
        h, w = shapes[unit.key]
        x0, y0, side = inst["augment"]["crop"]
        assert 0 <= x0 and 0 <= y0 and x0 + side <= w + 1e-9 and y0 + side <= h + 1e-9, inst["id"]


def test_no_background_or_instance_in_two_splits(out):
    instances = _instances(out)
    units_by_split = defaultdict(set)
    images_by_split = defaultdict(set)
    bytes_by_split = defaultdict(set)
    for inst in instances.values():
        units_by_split[inst["split"]].add(inst["unit"])
        images_by_split[inst["split"]].add(inst["image"])
        bytes_by_split[inst["split"]].add(_digest(out / inst["image"]))
    for table in (units_by_split, images_by_split, bytes_by_split):
        for i, a in enumerate(ms.SPLITS):
            for b in ms.SPLITS[i + 1 :]:
                assert not table[a] & table[b], (a, b)
    # every row of a split file uses only images of that split
    for stage in ms.STAGES:
        for split in ms.SPLITS:
            for row in _rows(out, stage, split):
                inst = instances[row["instance"]]
                assert inst["split"] == split and row["images"] == [inst["image"]]


# --- rows ----------------------------------------------------------------------------------------------------------


def test_every_row_is_valid_and_its_image_decodes(out):
    for stage in ms.STAGES:
        for split in ms.SPLITS:
            rows = _rows(out, stage, split)
            assert rows, (stage, split)
            ids = [r["id"] for r in rows]
            assert len(ids) == len(set(ids))
            for row in rows:
                assert validate_row(row, image_root=out) == [], row["id"]
                n_placeholders = sum(
                    part["type"] == "image"
                    for m in row.get("messages", row.get("prompt", []))
                    for part in m["content"]
                )
                assert n_placeholders == len(row["images"]) == 1


def test_instruct_has_2_to_4_turns_and_vqa_is_single_turn(out):
    for row in _rows(out, "instruct", "train"):
        assert 2 <= len(row["messages"]) // 2 <= 4
    for row in _rows(out, "vqa", "train"):
        assert len(row["messages"]) == 2
        assert row["answer_type"] in ("OPEN", "CLOSED") and row["question_type"] and row["modality"]


def test_closed_answers_are_balanced_per_question_type(out):
    for split in ms.SPLITS:
        counts = Counter(
            (r["question_type"], r["short_answer"])
            for r in _rows(out, "vqa", split)
            if r["answer_type"] == "CLOSED"
        )
        lesion_free = sum(inst["count"] == 0 for inst in _rows(out, "instances", split))
        for qtype in {q for q, _ in counts}:
            yes, no = counts[qtype, "yes"], counts[qtype, "no"]
            # balanced, unless every lesion-free image was already asked the presence question ("no" ran out)
            assert abs(yes - no) <= 1 or (qtype == "PRES" and no == lesion_free < yes), (
                split,
                qtype,
                yes,
                no,
            )
    closed = [r["short_answer"] for r in _rows(out, "vqa", "train") if r["answer_type"] == "CLOSED"]
    assert set(closed) == {"yes", "no"}


def test_grpo_has_lettered_choices(out):
    rows = _rows(out, "grpo", "train")
    choice = [r for r in rows if r["answer_type"] == "CHOICE"]
    assert choice and {r["answer_type"] for r in rows} == {"OPEN", "CLOSED", "CHOICE"}
    for r in choice:
        assert r["solution"] in "ABCD"
        assert f"\n{r['solution']}. " in vqa_question(r)


# --- answers agree with the ground truth, re-derived from the saved geometry and pixels ------------------------------


def _truth(inst: dict) -> dict:
    """side/position/count/size from the lesion geometry alone (not from the stored labels)."""
    half = inst["image_size"] / 2
    lesions = inst["lesions"]
    truth = {"count": str(len(lesions)), "modality": inst["modality"].lower(), "region": inst["region"]}
    if lesions:
        sides = {"left" if les["cx"] < half else "right" for les in lesions}
        positions = {"upper" if les["cy"] < half else "lower" for les in lesions}
        sizes = {
            "large" if les["rx"] >= ms.LARGE_RADIUS[0] * inst["image_size"] - 1e-6 else "small"
            for les in lesions
        }
        assert len(sides) == len(positions) == len(sizes) == 1  # one quadrant, one size per image
        truth.update(side=sides.pop(), position=positions.pop(), size=sizes.pop())
        truth["quadrant"] = f"{truth['position']} {truth['side']}"
        truth["contrast"] = {"bright": "brighter", "dark": "darker"}[inst["contrast"]]
    return truth


def _expected_closed(question: str, qtype: str, t: dict) -> str:
    q = question.lower()
    if qtype == "PRES":
        yes = t["count"] != "0"
    elif qtype == "COUNT":
        if "more than one" in q:
            yes = int(t["count"]) > 1
        else:
            word = re.search(r"exactly (\w+)", q).group(1)
            yes = ms.COUNT_WORDS[int(t["count"])] == word
    elif qtype == "POS":
        asked = next(w for w in ("left", "right", "upper", "lower") if re.search(rf"\b{w}\b", q))
        yes = asked in (t["side"], t["position"])
    elif qtype == "SIZE":
        yes = ("large" if "large" in q else "small") == t["size"]
    elif qtype == "ATTRIB":
        yes = ("brighter" if "brighter" in q else "darker") == t["contrast"]
    elif qtype == "MODALITY":
        asked = [m for m, phrases in ms.MODALITY_ASKED.items() if any(p.lower() in q for p in phrases)]
        assert len(asked) == 1, question
        yes = asked[0].lower() == t["modality"]
    elif qtype == "ORGAN":
        asked = [r for r, phrase in ms.REGION_PHRASE.items() if phrase.lower() in q]
        assert len(asked) == 1, question
        yes = asked[0] == t["region"]
    else:
        raise AssertionError(qtype)
    return "yes" if yes else "no"


def _expected_open(question: str, qtype: str, t: dict) -> str:
    q = question.lower()
    if qtype == "POS":
        if "left or the right" in q or "which side" in q:
            return t["side"]
        if "upper or" in q or "upper or lower" in q:
            return t["position"]
        return t["quadrant"]
    return {
        "MODALITY": t.get("modality"),
        "ORGAN": t.get("region"),
        "COUNT": t.get("count"),
        "SIZE": t.get("size"),
        "ATTRIB": t.get("contrast"),
    }[qtype]


def _check_statement(statement: str, question: str, qtype: str, t: dict) -> None:
    """A stated CLOSED answer's statement says the truth about what the question asks."""
    s, q = statement.lower(), question.lower()
    count = int(t["count"])
    if qtype in ("PRES", "COUNT"):
        if count == 0:
            assert s == "there is no lesion", statement
        else:
            noun = "lesion" if count == 1 else "lesions"
            assert s.startswith(f"there {'is' if count == 1 else 'are'} {ms.COUNT_WORDS[count]} {noun}"), (
                statement
            )
            assert (t["quadrant"] in s) == (qtype == "PRES"), statement
    elif qtype == "POS":
        asked = next(w for w in ("left", "right", "upper", "lower") if re.search(rf"\b{w}\b", q))
        truth = t["side"] if asked in ("left", "right") else t["position"]
        other = {"left": "right", "right": "left", "upper": "lower", "lower": "upper"}[truth]
        assert re.search(rf"\b{truth}\b", s) and not re.search(rf"\b{other}\b", s), statement
    elif qtype == "SIZE":
        assert s.endswith(t["size"]) and ("large" if t["size"] == "small" else "small") not in s, statement
    elif qtype == "ATTRIB":
        assert t["contrast"] in s and ({"brighter": "darker", "darker": "brighter"}[t["contrast"]]) not in s
    elif qtype == "MODALITY":
        stated = [m for m, phrase in ms.MODALITY_PHRASE.items() if phrase.lower() in s]
        assert [m.lower() for m in stated] == [t["modality"]], statement
    elif qtype == "ORGAN":
        stated = [r for r, phrase in ms.REGION_PHRASE.items() if phrase.lower() in s]
        assert stated == [t["region"]], statement
    if qtype in ("POS", "SIZE", "ATTRIB"):
        # the statement names the lesions as the question does ("the nodules")
        ref = re.search(r"\bthe ((?:focal )?(?:lesion|nodule)s?)\b", q).group(1)
        assert s.startswith(f"the {ref} "), (question, statement)


def test_vqa_and_grpo_answers_match_the_geometry(out):
    instances = _instances(out)
    checked = Counter()
    for split in ms.SPLITS:
        for stage in ("vqa", "grpo"):
            for row in _rows(out, stage, split):
                t = _truth(instances[row["instance"]])
                question, text, qtype = vqa_question(row), vqa_answer(row), row["question_type"]
                answer = row.get("short_answer", text)
                if stage == "vqa" and row["answer_type"] == "CLOSED":
                    # stated: "<statement>. <Verdict>." with the verdict as its last sentence
                    statement, verdict = text.rsplit(". ", 1)
                    assert text == stated_answer(statement, answer), (row["id"], text)
                    assert extract_answer(text).lower() == answer, (row["id"], text)
                    _check_statement(statement, question, qtype, t)
                    checked["stated"] += 1
                elif stage == "vqa":
                    assert text == answer, (row["id"], text)
                if row["answer_type"] == "CLOSED":
                    assert answer == _expected_closed(question, qtype, t), (row["id"], question, answer)
                elif row["answer_type"] == "OPEN":
                    assert answer == _expected_open(question, qtype, t), (row["id"], question, answer)
                else:
                    option = re.search(rf"^{answer}\. (.+)$", question, re.MULTILINE).group(1)
                    key = {"MODALITY": "modality", "ORGAN": "region", "COUNT": "count", "POS": "quadrant"}[
                        qtype
                    ]
                    assert option == t[key], (row["id"], question, answer)
                checked[row["answer_type"]] += 1
    assert checked["CLOSED"] and checked["OPEN"] and checked["CHOICE"] and checked["stated"]


def test_every_closed_kind_states_its_finding_and_open_kinds_do_not():
    for kind in ms.VQA_QUESTIONS:
        assert (kind.statement is not None) == (kind.answer_type == "CLOSED"), kind
        if isinstance(kind.statement, dict):
            assert set(kind.statement) == set(kind.wordings), kind


def test_captions_and_conversations_state_the_ground_truth(out):
    instances = _instances(out)
    for split in ms.SPLITS:
        for row in _rows(out, "captions", split) + _rows(out, "instruct", split):
            inst = instances[row["instance"]]
            t = _truth(inst)
            text = " ".join(
                p["text"] for m in row["messages"] if m["role"] == "assistant" for p in m["content"]
            ).lower()
            # the machine-readable facts are the ground truth (re-derived from the geometry)
            facts = row["facts"]
            assert facts["modality"].lower() == t["modality"] and facts["region"] == t["region"], row["id"]
            assert str(facts["lesion_count"]) == t["count"], row["id"]
            if t["count"] != "0":
                assert (facts["side"], facts["position"], facts["quadrant"]) == (
                    t["side"],
                    t["position"],
                    t["quadrant"],
                )
                assert facts["size"] == t["size"] and facts["contrast"] == inst["contrast"]
            else:
                assert set(facts) == {"modality", "region", "lesion_count"}
            if row["id"].startswith("medsynth-ins"):
                if t["count"] == "0":
                    assert re.search(r"\b(no|none|without)\b", text), text
                continue
            # captions and descriptions name the modality, the region, the count and the quadrant
            assert ms.MODALITY_PHRASE[inst["modality"]].lower() in text, text
            assert ms.REGION_PHRASE[inst["region"]].lower() in text, text
            if t["count"] == "0":
                assert re.search(r"\b(no|none|without)\b", text), text
            else:
                assert ms.COUNT_WORDS[int(t["count"])] in text.split() and t["quadrant"] in text, text
            for word in ("left", "right", "upper", "lower"):
                if re.search(rf"\b{word}\b", text):
                    assert word in (t["side"], t["position"]), (row["id"], text)


def test_held_out_splits_have_describe_this_image_rows(out):
    """Descriptions for fact recall: every split has "Describe this image."-style rows answered in sentences."""
    for split in ms.SPLITS:
        rows = _rows(out, "captions", split)
        described = [r for r in rows if vqa_question(r) in ms.DESCRIBE_INSTRUCTIONS]
        assert described, split
        for row in described:
            assert vqa_answer(row).startswith("This is ") and vqa_answer(row).count(". ") >= 1


def _difference(inst: dict, out: Path, library: dict, side: int) -> np.ndarray:
    """|saved image - its background re-rendered from the stored augmentation (noise included)|, grey, at
    `side` px."""
    background = ms.background_picture(library[inst["unit"]], inst["image_size"], inst["augment"])
    clean = ms._to_image(background).convert("L").resize((side, side), Image.BILINEAR)
    saved = Image.open(out / inst["image"]).convert("L").resize((side, side), Image.BILINEAR)
    return np.abs(np.asarray(saved, np.float32) - np.asarray(clean, np.float32))


def test_pixels_show_the_labelled_lesions_at_112px(out):
    """Re-render each background from its stored augmentation: the pixels changed are exactly the stored
    lesions, every blob of change lies in the labelled quadrant, each lesion shows, and each keeps its
    contrast after resizing to 112 px."""
    from scipy import ndimage

    instances = list(_instances(out).values())
    units, files, _ = ms.catalogue()
    used = {u.key: u for u in units if u.key in {i["unit"] for i in instances}}
    library = {k: ms.load_background((u, str(files[u.source]))) for k, u in used.items()}
    with_lesions = 0
    for inst in instances:
        size = inst["image_size"]
        diff = _difference(inst, out, library, size)
        ellipses = [(les["cx"], les["cy"], les["rx"], les["ry"], les["angle"]) for les in inst["lesions"]]
        assert len(ellipses) == inst["count"]
        inside = [ms._ellipse_distance(diff.shape, *e) < 1.0 for e in ellipses]
        union = np.any(inside, axis=0) if inside else np.zeros(diff.shape, bool)
        assert diff[~union].max(initial=0.0) <= 1.0, inst["id"]  # nothing changed outside the lesions
        if not ellipses:
            continue
        with_lesions += 1
        labels, n = ndimage.label(diff > 12, structure=np.ones((3, 3)))
        hit = set()
        for cy, cx in ndimage.center_of_mass(diff > 12, labels, range(1, n + 1)):
            assert ("left" if cx < size / 2 else "right") == inst["side"], inst["id"]
            assert ("upper" if cy < size / 2 else "lower") == inst["position"], inst["id"]
            hit |= {k for k, mask in enumerate(inside) if mask[int(cy), int(cx)]}
        assert len(hit) == inst["count"], (inst["id"], n, inst["count"])  # every lesion shows as change
        saved = Image.open(out / inst["image"])
        assert min(ms.measured_contrasts(saved, ellipses, size, 112)) >= ms.MIN_CONTRAST, inst["id"]
        small = _difference(inst, out, library, 112)
        for e in ellipses:
            core = ms._ellipse_distance(small.shape, *e[:2], *e[2:4], e[4], scale=112 / size) < 0.5
            assert small[core].max() >= 20, inst["id"]
    assert with_lesions


def test_readme_reports_the_counts(out):
    text = (out / "README.md").read_text()
    for stage in ms.STAGES:
        assert f"{stage}_<split>.jsonl" in text
    assert (
        "Held out whole for the unseen split" in text and "us-heart-tee (pydicom-data: color-px.dcm)" in text
    )
    assert "Licences of the packages used" in text and "wsidicom-data | Apache-2.0" in text
    n_train = len(_rows(out, "vqa", "train"))
    assert re.search(rf"\| vqa_<split>\.jsonl\s*\| {n_train}\s*\|", text)
    assert "CLOSED answers (yes / no)" in text and "Question text alone" in text


def test_augmentation_draws_window_and_noise_and_reproduces_them():
    """Every augmentation parameter is stored; re-applying it gives the same picture, and the noise differs between
    two seeds (the noise is not one fixed pattern)."""
    units, files, _ = ms.catalogue()
    unit = next(u for u in units if u.source == "ct-abdomen" and u.split == "train")
    background = ms.load_background((unit, str(files[unit.source])))
    rng = np.random.default_rng(0)
    params = [ms.sample_augment(background, ms.SOURCE_BY_KEY[unit.source], rng) for _ in range(20)]
    assert all(
        set(p) == {"crop", "flip_lr", "flip_ud", "window", "gamma", "noise", "noise_seed"} for p in params
    )
    assert len({tuple(p["window"]) for p in params}) == 20 and max(p["noise"] for p in params) > 1
    a, b = (ms.background_picture(background, 224, p) for p in params[:2])
    assert np.array_equal(a, ms.background_picture(background, 224, params[0])) and not np.array_equal(a, b)
    noisy = dict(params[0], noise=4.0)
    residual = ms.background_picture(background, 224, noisy) - ms.apply_augment(background, 224, noisy)
    assert 2.0 < float(residual[(a > 20) & (a < 235)].std()) < 6.0


if __name__ == "__main__":
    # Regenerate the manifest after an intended change of the output: python tests/test_medsynth.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built_dir = _build(Path(tmp) / "a", 3, 1)
        files = {
            p.relative_to(built_dir).as_posix(): _digest(p)
            for p in sorted(built_dir.rglob("*"))
            if p.is_file()
        }
    about = (
        f"sha256 of every file of `python -m data_pipelines.medsynth --out DIR --seed 3 --size {SIZE}`, written by "
        "`python tests/test_medsynth.py`. Change it only together with an intended change of the build's output."
    )
    manifest = {"about": about, "args": ["--seed", "3", "--size", SIZE], "files": dict(sorted(files.items()))}
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {MANIFEST} ({len(files)} files)")
