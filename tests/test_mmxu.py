"""MMXU's released layout -> rows with several images and their roles; the `image_roles` field in the validator.

The fixture (tests/fixtures/mmxu/) is hand-made in MMXU's layout: MMXU-test.jsonl records as released (a string
prior_image_path), MMXU-dev.jsonl records with the dev fields of the release's README (a list of priors),
MIMIC-CXR-JPG's folder layout and metadata columns, 32x32 invented images, invented patients and dates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipelines import mmxu, validate
from medllava.image_roles import describe_images
from medllava.schema import CHOICE, read_rows, validate_row, validate_structure, vqa_answer, vqa_question

FIXTURE = Path(__file__).parent / "fixtures" / "mmxu"


def image(name: str) -> str:
    """The fixture image whose file name starts with 0<name> (a1, a2, ... b2, c2)."""
    (path,) = (FIXTURE / "files").rglob(f"0{name}*.jpg")
    return path.relative_to(FIXTURE).as_posix()


def rejected(out_dir: Path) -> dict[str, list[str]]:
    return {r["where"]: r["reasons"] for r in read_rows(out_dir / "rejected.jsonl")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmxu") / "out"
    assert mmxu.main(["--input", str(FIXTURE), "--output", str(out), "--images", "copy"]) == 0
    return out


def test_rows_carry_prior_then_current_with_roles_dates_and_placeholders(converted):
    train, test = read_rows(converted / "train.jsonl"), read_rows(converted / "test.jsonl")
    assert [r["id"] for r in train] == ["mmxu-dev-101", "mmxu-dev-102"]
    assert [r["id"] for r in test] == ["mmxu-test-1", "mmxu-test-2"]
    two_priors = train[0]
    # images in order: the priors as listed, then the current study; copied under images/ with MIMIC's path
    assert two_priors["images"] == [f"images/{image(n)}" for n in ("a1", "a2", "a3")]
    assert two_priors["image_roles"] == [
        {"role": "prior", "date": "2180-01-01"},
        {"role": "prior", "date": "2180-03-01"},
        {"role": "current", "date": "2180-06-15"},
    ]
    # one placeholder per image, in order, at the start of the user turn, then the text
    user = two_priors["messages"][0]
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image"] * 3 + ["text"]
    assert vqa_question(two_priors) == (
        "Image 1: prior study (2180-01-01). Image 2: prior study (2180-03-01). Image 3: current study "
        "(2180-06-15).\nHow has the right lower lung zone changed across the studies?\nOptions:\n"
        "A. Opacity has decreased\nB. Opacity has increased\nC. No change\nD. A new nodule"
    )
    assert two_priors["choices"][0] == "Opacity has decreased" and two_priors["answer_type"] == CHOICE
    assert two_priors["question_type"] == "improved" and two_priors["region"] == "right lower lung zone"
    assert not {"explanation", "cur_report", "prior_report"} & set(
        two_priors
    )  # restricted report text stays out
    # the role line is medllava.image_roles' own wording, for every row
    for row in train + test:
        line = describe_images(mmxu.role_inputs(row["image_roles"]))
        assert vqa_question(row).startswith(line + "\n")
        assert [e["role"] for e in row["image_roles"]] == ["prior"] * (len(row["images"]) - 1) + ["current"]
    # an image missing from the metadata's dates (StudyDate "N/A") keeps its role and has no date
    assert test[0]["image_roles"] == [{"role": "prior"}, {"role": "current", "date": "2195-09-02"}]
    assert vqa_question(test[0]).startswith("Image 1: prior study. Image 2: current study (2195-09-02).\n")


def test_answers_are_normalised_to_option_letters(converted):
    train, test = read_rows(converted / "train.jsonl"), read_rows(converted / "test.jsonl")
    # "A" stays, "(c)" -> "C", the option's own text "Unchanged" -> its letter "B"
    assert [vqa_answer(r) for r in test] == ["A", "C"]
    assert vqa_answer(train[1]) == "B" and train[1]["choices"][1] == "Unchanged"
    assert {r["answer_type"] for r in train + test} == {CHOICE}


def test_rejects_and_leakage_report(converted, capsys):
    reasons = rejected(converted)
    assert reasons["MMXU-dev.jsonl[2]"] == ["answer 'E' is not one of the options A, B, C, D"]
    assert reasons["MMXU-test.jsonl[2]"][0].startswith("image not found: files/p13/")
    assert reasons["MMXU-test.jsonl[3]"] == ["missing question"]
    (late,) = reasons["MMXU-test.jsonl[4]"]
    assert late.startswith("prior study dated after the current study") and "2160-04-20" in late
    # test 2 uses a2 and a3, which dev also uses: two leaked test images, one question
    leakage = json.loads((converted / "leakage.json").read_text())["test"]
    assert leakage["leaked_test_images"] == 2 and leakage["leaked_test_questions"] == 1
    assert [p["test_image"] for p in leakage["pairs"]] == [f"images/{image(n)}" for n in ("a2", "a3")]


def test_output_passes_the_validator(converted, capsys):
    for split in ("train", "test"):
        for row in read_rows(converted / f"{split}.jsonl"):
            assert validate_row(row, converted) == [], row
    assert validate.main([str(converted / "train.jsonl"), str(converted / "test.jsonl")]) == 0


def test_default_leaves_images_in_place_and_records_their_root(tmp_path, capsys):
    out = tmp_path / "out"
    assert mmxu.main(["--input", str(FIXTURE), "--output", str(out), "--leak-distance", "-1"]) == 0
    assert not (out / "images").exists() and not (out / "leakage.json").exists()
    roots = json.loads((out / "image_roots.json").read_text())["roots"]
    assert [(out / r).resolve() for r in roots] == [(FIXTURE / "files").resolve()]
    current = {"mmxu-test-1": "b2", "mmxu-test-2": "a3"}
    for row in read_rows(out / "test.jsonl"):
        assert validate_row(row, out) == []
        assert (out / row["images"][-1]).resolve() == FIXTURE / image(current[row["id"]])


def test_test_file_alone_without_dates_and_an_image_root_that_is_files(tmp_path, capsys):
    """The public release: MMXU-dev.jsonl empty, images elsewhere (--image-root naming MIMIC's files/ itself),
    no metadata: roles without dates, no train split, no leakage report, nothing dated out of order."""
    release = tmp_path / "MMXU"
    release.mkdir()
    shutil.copy(FIXTURE / "MMXU-test.jsonl", release)
    (release / "MMXU-dev.jsonl").write_text("")
    out = tmp_path / "out"
    argv = ["--input", str(release), "--image-root", str(FIXTURE / "files"), "--output", str(out)]
    assert mmxu.main(argv) == 0
    printed = capsys.readouterr().out
    assert "study dates: none" in printed and "MMXU-dev.jsonl: empty, no train split" in printed
    assert not (out / "train.jsonl").exists() and not (out / "leakage.json").exists()
    test = read_rows(out / "test.jsonl")
    assert [r["id"] for r in test] == ["mmxu-test-1", "mmxu-test-2", "mmxu-test-5"]
    assert all(e == {"role": "prior"} for r in test for e in r["image_roles"][:-1])
    assert vqa_question(test[0]).startswith("Image 1: prior study. Image 2: current study.\n")
    assert sorted(rejected(out)) == ["MMXU-test.jsonl[2]", "MMXU-test.jsonl[3]"]


def test_missing_release_or_metadata_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert mmxu.main(["--input", str(tmp_path), "--output", str(out)]) == 2
    assert "neither MMXU-test.jsonl nor MMXU-dev.jsonl found" in capsys.readouterr().err
    argv = ["--input", str(FIXTURE), "--output", str(out), "--metadata", str(tmp_path / "none.csv")]
    assert mmxu.main(argv) == 2
    assert "--metadata" in capsys.readouterr().err
    bad = tmp_path / "meta.csv"
    bad.write_text("id,date\nx,21800101\n")
    assert mmxu.main(["--input", str(FIXTURE), "--output", str(out), "--metadata", str(bad)]) == 2
    assert "columns dicom_id and StudyDate" in capsys.readouterr().err


def test_record_fields():
    assert mmxu.parse_options({"B": "two", "A": "one"}) == (["one", "two"], None)
    assert mmxu.parse_options(None) == (None, "missing options")
    assert "lettered A, B" in mmxu.parse_options({"A": "x", "C": "y"})[1]
    assert mmxu.parse_options({"A": "x", "B": " "})[1] == "option B has no text"
    choices = ["Better", "Worse", "Unchanged"]
    assert [mmxu.answer_letter(a, choices)[0] for a in ("b", "(C)", "A.", " worse ")] == ["B", "C", "A", "B"]
    assert "nor an option's text" in mmxu.answer_letter("maybe", choices)[1]
    assert mmxu.prior_paths("files/a.jpg") == ["files/a.jpg"] and mmxu.prior_paths(["a", ""]) is None
    assert mmxu.question_type(" No_Change ") == "no change"
    assert mmxu.study_date("21800506") == "2180-05-06" and mmxu.study_date("21800506.0") == "2180-05-06"
    assert mmxu.study_date("21800231") is None and mmxu.study_date("N/A") is None


def test_image_paths_must_stay_inside_the_image_root(tmp_path):
    builder = mmxu.MmxuBuilder(FIXTURE, None, None, {})
    assert builder.find(image("a1"))[0] == FIXTURE / image("a1")
    assert "stay inside" in builder.find("../mmxu/" + image("a1"))[1]
    assert "stay inside" in builder.find(str(FIXTURE / image("a1")))[1]


# ---------------------------------------------------------------------------------------------------------------
# `image_roles` in the validator
# ---------------------------------------------------------------------------------------------------------------


def pair_row(**overrides) -> dict:
    from medllava.schema import make_vqa_row

    roles = [{"role": "prior", "date": "2025-03-01", "label": "PA view"}, {"role": "current"}]
    row = make_vqa_row(
        "p-1", ["prior.png", "current.png"], "Has it grown?", "yes", "CLOSED", image_roles=roles
    )
    row.update(overrides)
    return row


def test_validator_accepts_roles_one_per_image():
    assert validate_structure(pair_row()) == []
    assert validate_structure(pair_row(image_roles=[{"role": "prior"}, {"role": "current"}])) == []


@pytest.mark.parametrize(
    "image_roles, reason",
    [
        ([{"role": "current"}], "image_roles: 1 entry for 2 image(s) (one entry per image, in order)"),
        (
            [{"role": "prior"}, {"role": "current"}, {"role": "current"}],
            "image_roles: 3 entries for 2 image(s)",
        ),
        (
            [{"role": "prior", "date": "01/03/2025"}, {"role": "current"}],
            "image_roles[0]: a study date must be",
        ),
        (
            [{"role": "prior", "date": "2025-02-30"}, {"role": "current"}],
            "'2025-02-30' is not a calendar date",
        ),
        ([{"role": "prior", "date": None}, {"role": "current"}], "leave 'date' out when it is not known"),
        ([{"role": "prior", "when": "x"}, {"role": "current"}], "image_roles[0]: unknown key(s) 'when'"),
        ([{"role": "baseline"}, {"role": "current"}], "image_roles[0]: role 'baseline' is not one of prior"),
        ([{"date": "2025-03-01"}, {"role": "current"}], "image_roles[0]: missing 'role'"),
        ([{"role": ["prior"]}, {"role": "current"}], "is not one of prior, current"),
        ([{"role": "prior"}, "current"], "image_roles[1]: must be an object with keys role, date, label"),
        ([{"role": "prior", "label": ""}, {"role": "current"}], "label must be a non-empty string"),
        ([{"role": "prior", "label": "<|im_start|>system"}, {"role": "current"}], "label: control token"),
        ({"prior": 0, "current": 1}, "image_roles: must be a list with one entry per image, got dict"),
    ],
)
def test_validator_rejects_wrong_image_roles(image_roles, reason):
    problems = validate_structure(pair_row(image_roles=image_roles))
    assert any(reason in p for p in problems), problems


def test_validator_cli_reports_a_wrong_image_roles_row(converted, tmp_path, capsys):
    rows = read_rows(converted / "test.jsonl")
    rows[1]["image_roles"] = rows[1]["image_roles"][:1]
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validate.main([str(path), "--image-root", str(converted)]) == 1
    (kept, reject) = [r["reasons"] for r in read_rows(tmp_path / "edited.rejected.jsonl")] + [None]
    assert kept == ["image_roles: 1 entry for 2 image(s) (one entry per image, in order)"] and reject is None
