"""medsynth's multi-image families (`python -m data_pipelines.medsynth.multi`): longitudinal pairs and volume rows.

Two small builds (--size 0.02: 32 pairs and 24 volume instances, ~6 s each) are made once per module, one
in-process and one through the command line; they must be byte-identical. Every answer is re-derived from the
stored ground truth, and the ground truth from the pixels: each pair's backgrounds are re-rendered from their
stored augmentation, each volume's slices re-rendered without the lesion through medllava.volumes from the
package's own file.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import medsynth as ms
from data_pipelines import validate
from data_pipelines.medsynth import longitudinal, multi, volume_rows
from medllava.image_roles import ImageInput, describe_images
from medllava.processing import load_image
from medllava.prompts import extract_answer
from medllava.schema import read_rows, read_valid_rows, validate_row, vqa_answer, vqa_question
from medllava.volumes import load_volume

SIZE = "0.02"
SEED = "2"
REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
FAMILIES = ("longitudinal", "volume")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("medsynth_multi")
    multi.build(multi.parse_args(["--out", str(root / "a"), "--seed", SEED, "--size", SIZE]))
    done = subprocess.run(
        [sys.executable, "-m", "data_pipelines.medsynth.multi", "--out", str(root / "b"), "--seed", SEED]
        + ["--size", SIZE],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def out(built):
    return built[0]


def _instances(out: Path, family: str) -> dict[str, dict]:
    return {i["id"]: i for split in SPLITS for i in read_rows(out / f"instances_{family}_{split}.jsonl")}


def _rows(out: Path, family: str) -> list[dict]:
    return [r for split in SPLITS for r in read_rows(out / f"{family}_{split}.jsonl")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- determinism, files, validity ----------------------------------------------------------------------------


def test_same_seed_builds_byte_identical_files(built):
    a, b = built
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for family in FAMILIES:
        for split in SPLITS:
            assert f"{family}_{split}.jsonl" in files and f"instances_{family}_{split}.jsonl" in files
    assert any(f.startswith("images/long-") for f in files) and any(
        f.startswith("images/vol-") for f in files
    )
    assert [f for f in files if _digest(a / f) != _digest(b / f)] == []


def test_default_build_files_are_not_written(out):
    """The default set's files (`make data`) are not touched: only this tool's own names."""
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in multi.our_files(out) if p.parent == out} | {"images"}
    assert not any((out / f"{stage}_train.jsonl").exists() for stage in ms.STAGES)


def test_rows_pass_the_validator_and_load_with_their_images(out, capsys):
    paths = [out / f"{family}_{split}.jsonl" for family in FAMILIES for split in SPLITS]
    assert validate.main([str(p) for p in paths]) == 0
    assert "rejected: 0" in capsys.readouterr().out
    for path in paths:
        rows = read_rows(path)
        assert rows, path
        loaded = [row for _, row in read_valid_rows(path, require_images=True)]
        assert len(loaded) == len(rows)
        for row in rows:
            assert validate_row(row, image_root=out) == [], row["id"]
        for image in loaded[0]["images"]:
            picture = load_image(image)
            assert picture.mode == "RGB" and min(picture.size) >= 64


def test_existing_build_is_not_overwritten_silently(out):
    with pytest.raises(SystemExit, match="--overwrite"):
        multi.build(multi.parse_args(["--out", str(out), "--size", SIZE]))


def test_cli_rejects_bad_arguments():
    for bad in (["--size", "0"], ["--image-size", "64"]):
        with pytest.raises(SystemExit):
            multi.parse_args(["--out", "x", *bad])


# --- splits and sources ---------------------------------------------------------------------------------------


def test_no_background_is_in_two_splits_and_each_keeps_the_default_builds_split(out):
    units, _, _ = ms.catalogue()
    split_of = {u.key: u.split for u in units}
    for family in FAMILIES:
        by_split = defaultdict(set)
        for inst in _instances(out, family).values():
            by_split[inst["split"]].add(inst["unit"])
        for one in SPLITS:
            for other in SPLITS:
                if one < other:
                    assert not by_split[one] & by_split[other], (family, one, other)
    for pair in _instances(out, "longitudinal").values():
        assert split_of[pair["unit"]] == pair["split"], pair["id"]
    slabs = defaultdict(list)
    for inst in _instances(out, "volume").values():
        source, lo, hi = re.fullmatch(r"(.+)#(\d+)-(\d+)", inst["unit"]).groups()
        lo, hi = int(lo), int(hi)
        assert (
            inst["slab"] == [lo, hi] and lo <= min(inst["array_indices"]) <= max(inst["array_indices"]) <= hi
        )
        # every catalogue slice inside the slab is of the slab's split, and none of the default build's unseen
        inside = [u for u in units if u.source == source and u.index is not None and lo <= u.index <= hi]
        assert inside and {u.split for u in inside} == {inst["split"]}, inst["id"]
        slabs[source].append((lo, hi, inst["split"]))
    for source, spans in slabs.items():
        for lo, hi, split in spans:
            for lo2, hi2, split2 in spans:
                if split != split2:
                    assert hi < lo2 or hi2 < lo, (source, lo, hi, lo2, hi2)
    images = defaultdict(set)
    for family in FAMILIES:
        for row in _rows(out, family):
            images[row["id"].split("-")[-2]] |= set(row["images"])
    assert not images["train"] & images["test"] and not images["train"] & images["val"]


def test_backgrounds_come_from_pypi_packages_only(out):
    units, files, _ = ms.catalogue()
    unseen = {u.source for u in units if u.split == ms.UNSEEN}
    for family in FAMILIES:
        for inst in _instances(out, family).values():
            assert inst["source"] not in unseen
            package = inst["file"].split("/")[0]
            assert package in ms.PACKAGE_DIRS, inst["file"]
            multi.check_pypi_file(files[inst["source"]])
    for foreign in (
        "/usr/lib/python3/dist-packages/nibabel/tests/data/example4d.nii.gz",
        "/usr/share/pixmaps/scan.png",
        "/srv/app/node_modules/dicom-samples/ct.dcm",
    ):
        with pytest.raises(ValueError, match="Debian or npm"):
            multi.check_pypi_file(Path(foreign))


# --- longitudinal pairs ---------------------------------------------------------------------------------------


def _status(lesion: dict) -> str:
    """A lesion's change, from its geometry on the two studies."""
    prior, current = lesion["prior"], lesion["current"]
    if prior is None:
        return "new"
    if current is None:
        return "resolved"
    for study in (prior, current):
        assert study["area"] == pytest.approx(math.pi * study["rx"] * study["ry"], abs=0.01)
    if current["area"] > prior["area"]:
        assert current["area"] >= 2 * prior["area"]  # a change one can see
        return "grown"
    if current["area"] < prior["area"]:
        assert prior["area"] >= 2 * current["area"]
        return "shrunk"
    assert (prior["cx"], prior["cy"], prior["angle"]) == (current["cx"], current["cy"], current["angle"])
    return "unchanged"


def test_longitudinal_answers_follow_from_the_stored_geometry(out):
    pairs = _instances(out, "longitudinal")
    seen_types = set()
    for pair in pairs.values():
        statuses = [_status(les) for les in pair["lesions"]]
        assert statuses == [les["status"] for les in pair["lesions"]]
        changed = set(statuses) - {"unchanged"}
        assert len(changed) <= 1 and pair["change"] == (changed.pop() if changed else "unchanged")
        assert pair["new_count"] == statuses.count("new")
        assert pair["prior"]["date"] < pair["current"]["date"]
    for row in _rows(out, "longitudinal"):
        pair = pairs[row["instance"]]
        statuses = [_status(les) for les in pair["lesions"]]
        assert row["images"] == [pair["prior"]["image"], pair["current"]["image"]]
        assert row["unit"] == pair["unit"] and row["modality"] == pair["modality"]
        assert row["image_roles"] == [
            {"role": "prior", "date": pair["prior"]["date"]},
            {"role": "current", "date": pair["current"]["date"]},
        ]
        line = f"Image 1: prior study ({pair['prior']['date']}). Image 2: current study ({pair['current']['date']})."
        question, answer = vqa_question(row), vqa_answer(row)
        assert question.split("\n")[0] == line
        kind = row["question_type"]
        seen_types.add(kind)
        if kind == "CHANGE":
            expected = pair["change"]
        elif kind == "NEW_COUNT":
            expected = str(statuses.count("new"))
        elif kind == "NEW":
            expected = "yes" if "new" in statuses else "no"
            n = statuses.count("new")
            assert ("no new lesion" in answer) == (n == 0)
            assert n == 0 or f"{ms.COUNT_WORDS[n]} new lesion" in answer
        else:
            assert kind == "GROWN"
            lesion = pair["lesions"]
            assert len(lesion) == 1 and lesion[0]["prior"] and lesion[0]["current"]
            expected = "yes" if lesion[0]["current"]["area"] > lesion[0]["prior"]["area"] else "no"
            assert {"grown": "has grown", "shrunk": "has shrunk", "unchanged": "is unchanged"}[
                statuses[0]
            ] in answer
        assert row["short_answer"] == expected, row["id"]
        if row["answer_type"] == "CLOSED":
            assert extract_answer(answer) == expected.capitalize() and answer != expected
        else:
            assert answer == expected
    assert seen_types == {"CHANGE", "NEW", "NEW_COUNT", "GROWN"}


def _rendered_difference(study: dict, background: np.ndarray, saved: Path, size: int) -> np.ndarray:
    plain = ms._to_image(ms.background_picture(background, size, study["augment"]))
    a = np.asarray(Image.open(saved), np.float32)
    b = np.asarray(plain, np.float32)
    diff = np.abs(a - b)
    return diff.max(axis=-1) if diff.ndim == 3 else diff


def test_pairs_pixels_change_exactly_where_the_labelled_lesions_are(out):
    """Re-render both studies of every pair without lesions from the stored augmentation: pixels changed only
    inside that study's lesions, every lesion of a study shows there, and the lesions are contrasted at 112 px."""
    pairs = list(_instances(out, "longitudinal").values())
    units, files, _ = ms.catalogue()
    by_key = {u.key: u for u in units}
    library = {}
    for pair in pairs:
        if pair["unit"] not in library:
            unit = by_key[pair["unit"]]
            library[pair["unit"]] = ms.load_background((unit, str(files[unit.source])))
        size = pair["image_size"]
        for when in ("prior", "current"):
            study = pair[when]
            diff = _rendered_difference(study, library[pair["unit"]], out / study["image"], size)
            present = [les[when] for les in pair["lesions"] if les[when] is not None]
            ellipses = [(g["cx"], g["cy"], g["rx"], g["ry"], g["angle"]) for g in present]
            inside = [ms._ellipse_distance(diff.shape, *e) < 1.0 for e in ellipses]
            union = np.any(inside, axis=0) if inside else np.zeros(diff.shape, bool)
            assert diff[~union].max(initial=0.0) <= 1.0, (pair["id"], when)
            for e, mask in zip(ellipses, inside, strict=True):
                core = ms._ellipse_distance(diff.shape, *e) < 0.5
                assert diff[core].max() >= 20 and mask.any(), (pair["id"], when)
            if ellipses:
                saved = Image.open(out / study["image"])
                assert min(ms.measured_contrasts(saved, ellipses, size, 112)) >= ms.MIN_CONTRAST, pair["id"]


def test_current_study_is_the_prior_picture_with_jitter_only():
    prior = {
        "crop": [1.0, 2.0, 100.0],
        "flip_lr": True,
        "flip_ud": False,
        "window": [0.0, 255.0],
        "gamma": 1.0,
    }
    prior |= {"noise": 3.0, "noise_seed": 5}
    current = longitudinal.jitter_augment(prior, np.random.default_rng(0))
    assert {k: current[k] for k in ("crop", "flip_lr", "flip_ud")} == {
        k: prior[k] for k in ("crop", "flip_lr", "flip_ud")
    }
    assert all(
        abs(c - p) <= longitudinal.WINDOW_JITTER
        for c, p in zip(current["window"], prior["window"], strict=True)
    )
    assert abs(math.log(current["gamma"])) <= longitudinal.GAMMA_JITTER + 1e-4
    assert current["noise_seed"] != prior["noise_seed"]


# --- volumes --------------------------------------------------------------------------------------------------


def _sections(inst: dict) -> list[int]:
    """Voxels of the stored ellipsoid on each shown slice, computed here from the geometry alone."""
    les = inst["lesion"]
    ci, cj, cz = les["center_voxel"]
    a, b = les["semi_axes_mm"]
    rz, angle = les["semi_axis_slices"], les["angle"]
    si, sj, _ = inst["voxel_mm"]
    n0, n1, _ = inst["volume_shape"]
    x = (np.arange(n0)[:, None] - ci) * si
    y = (np.arange(n1)[None, :] - cj) * sj
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    return [
        int(((u / a) ** 2 + (v / b) ** 2 + ((k - cz) / rz) ** 2 < 1.0).sum()) for k in inst["array_indices"]
    ]


def test_volume_answers_follow_from_the_stored_geometry(out):
    volumes = _instances(out, "volume")
    with_lesion = 0
    for inst in volumes.values():
        assert len(inst["images"]) == len(inst["array_indices"]) == len(inst["positions_mm"])
        assert volume_rows.MIN_SHOWN <= len(inst["images"]) <= volume_rows.N_SHOWN
        les = inst["lesion"]
        if les is None:
            continue
        with_lesion += 1
        sections = _sections(inst)
        assert sections == les["section_voxels"], inst["id"]
        visible = [s > 0 for s in sections]
        assert les["visible"] == visible and les["visible_count"] == sum(visible) >= 1
        assert "".join("1" if v else "0" for v in visible).strip("0").count("0") == 0  # neighbouring slices
        ranked = sorted(sections, reverse=True)
        assert les["largest"] == sections.index(ranked[0]) + 1
        assert len(ranked) == 1 or ranked[0] >= volume_rows.LARGEST_MARGIN * ranked[1]
        peak = max(sections)
        assert all(s == 0 or s >= volume_rows.MIN_SECTION**2 * peak * 0.8 for s in sections)  # no sliver
    assert with_lesion
    for row in _rows(out, "volume"):
        inst = volumes[row["instance"]]
        question, answer = vqa_question(row), vqa_answer(row)
        n = len(inst["images"])
        assert row["images"] == inst["images"] and row["unit"] == inst["unit"]
        assert question.split("\n")[0] == inst["prompt_line"]
        assert inst["prompt_line"].startswith(f"Images 1-{n}: MR volume. Slices (axial, inferior to superior")
        les = inst["lesion"]
        if row["question_type"] == "VIS_COUNT":
            expected = str(sum(s > 0 for s in _sections(inst)))
        elif row["question_type"] == "LARGEST":
            sections = _sections(inst)
            expected = str(sections.index(max(sections)) + 1)
        else:
            assert row["question_type"] == "PRES"
            expected = "yes" if les else "no"
            assert extract_answer(answer) == expected.capitalize()
            assert (
                (f"on {les['visible_count']} of the {n} slices" in answer) if les else ("no lesion" in answer)
            )
        assert row["short_answer"] == expected, row["id"]
        if row["answer_type"] == "OPEN":
            assert answer == expected


def test_volume_slices_show_the_lesion_exactly_on_its_slices(out):
    """Re-render every instance's slices without the lesion through medllava.volumes from the package file:
    a lesion-free instance is those slices exactly; otherwise the pixels change on the slices the lesion cuts
    and nowhere else, most on the slice named largest; the prompt line is ImageInput.from_volume's."""
    _, files, _ = ms.catalogue()
    loaded = {}
    for inst in _instances(out, "volume").values():
        if inst["source"] not in loaded:
            loaded[inst["source"]] = load_volume(files[inst["source"]], modality="MR")
        plain = loaded[inst["source"]].slices(
            indices=inst["indices"], axis="axial", max_side=volume_rows.MAX_SIDE
        )
        assert plain.prompt_text == inst["prompt_text"]
        assert describe_images([ImageInput.from_volume(plain)]) == inst["prompt_line"]
        changed = []
        for name, before in zip(inst["images"], plain.images, strict=True):
            saved = np.asarray(Image.open(out / name).convert("L"), np.float32)
            changed.append(int((np.abs(saved - np.asarray(before.convert("L"), np.float32)) >= 24).sum()))
        les = inst["lesion"]
        if les is None:
            assert changed == [0] * len(changed), inst["id"]
            continue
        assert [c > 0 for c in changed] == les["visible"], (inst["id"], changed)
        assert changed == les["rendered_pixels"]
        assert changed.index(max(changed)) + 1 == les["largest"]
