"""eval.generate and eval.score on multi-image rows: prior-only and volume controls, per-family scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_image

from eval import generate as gen
from eval import score as sc
from medllava.image_roles import ImageInput, with_image_roles
from medllava.schema import SchemaError, make_vqa_row

PAIR = [ImageInput(role="prior", date="2024-01-10"), ImageInput(role="current", date="2024-07-02")]
ROLES = [{"role": "prior", "date": "2024-01-10"}, {"role": "current", "date": "2024-07-02"}]


def pair_row(i: int, question: str, answer: str, answer_type: str, question_type: str, pair: int) -> dict:
    images = [f"images/pair{pair}-prior.png", f"images/pair{pair}-current.png"]
    text = with_image_roles(question, PAIR)
    return make_vqa_row(
        f"long{i}", images, text, answer, answer_type, question_type=question_type, image_roles=ROLES
    )


def volume_row(i: int, question: str, answer: str, answer_type: str, question_type: str, vol: int, n: int):
    images = [f"images/vol{vol}-{k}.png" for k in range(1, n + 1)]
    slices = ", ".join(str(2 * k) for k in range(n))
    text = f"Images 1-{n}: MR volume. Slices (axial, mm from the first): {slices}.\n{question}"
    return make_vqa_row(f"vol{i}", images, text, answer, answer_type, question_type=question_type)


def write_rows(directory: Path, rows: list[dict]) -> Path:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(sorted({p for r in rows for p in r["images"]})):
        random_image(seed, size=(32, 30)).save(directory / name)
    path = directory / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def multi_fixture(directory: Path) -> Path:
    """Two prior/current rows, two 3-slice volume rows; closed answers state a finding, then the verdict."""
    return write_rows(
        directory,
        [
            pair_row(0, "What changed since the prior study?", "grown", "OPEN", "CHANGE", pair=0),
            pair_row(
                1,
                "Is there a new lesion on the current study?",
                "There are two new lesions on the current study. Yes.",
                "CLOSED",
                "NEW",
                pair=1,
            ),
            volume_row(
                0, "On how many of the shown slices is the lesion visible?", "2", "OPEN", "VIS_COUNT", 0, 3
            ),
            volume_row(
                1,
                "Is there a lesion in this volume?",
                "There is no lesion in this volume. No.",
                "CLOSED",
                "PRES",
                1,
                3,
            ),
        ],
    )


def names(images) -> list[str]:
    return [Path(p).name for p in images]


# ---------------------------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------------------------


def test_prior_shuffle_keeps_every_current_image_and_changes_every_prior(tmp_path):
    rows = [
        pair_row(i, "What changed since the prior study?", "new", "OPEN", "CHANGE", pair=i % 4)
        for i in range(6)
    ]
    rows += [volume_row(0, "Is there a lesion in this volume?", "Yes", "CLOSED", "PRES", 0, 3)]
    rows += [make_vqa_row("single", ["images/single.png"], "Is there a mass?", "no", "CLOSED")]
    questions = gen.load_questions(write_rows(tmp_path, rows), None, {})
    assert questions[0].image_roles == ["prior", "current"] and questions[-1].image_roles is None
    for seed in range(5):
        shuffled = gen.shuffle_priors(questions, seed)
        for s, q in zip(shuffled[:6], questions[:6], strict=True):
            assert s.images[1] == q.images[1]  # the current study stays
            assert s.images[0] != q.images[0] and names(s.images)[0].endswith("-prior.png")
        assert [s.images for s in shuffled[6:]] == [q.images for q in questions[6:]]  # no prior: unchanged
        # rows about one pair still share one prior; the priors are a permutation of the real ones
        assert shuffled[0].images == shuffled[4].images
        assert {s.images[0] for s in shuffled[:6]} == {q.images[0] for q in questions[:6]}
    assert [s.images for s in gen.shuffle_priors(questions, 3)] == [
        s.images for s in gen.shuffle_priors(questions, 3)
    ]
    with pytest.raises(SchemaError, match="at least two different prior images .* found 1"):
        gen.shuffle_priors([questions[0], questions[4], *questions[6:]], seed=0)


def test_volume_shuffle_keeps_slice_counts_and_takes_another_volume(tmp_path):
    rows = [
        volume_row(i, "Is there a lesion in this volume?", "Yes", "CLOSED", "PRES", i % 3, 3)
        for i in range(4)
    ]
    rows += [
        volume_row(4, "Which slice shows the lesion largest?", "2", "OPEN", "LARGEST", 3, 5)
    ]  # alone with 5
    rows += [pair_row(0, "What changed since the prior study?", "new", "OPEN", "CHANGE", pair=0)]
    questions = gen.load_questions(write_rows(tmp_path, rows), None, {})
    for seed in range(5):
        shuffled = gen.shuffle_volumes(questions, seed)
        assert [len(s.images) for s in shuffled] == [len(q.images) for q in questions]
        for s, q in zip(shuffled[:5], questions[:5], strict=True):
            volume = {n.split("-")[0] for n in names(s.images)}
            assert len(volume) == 1 and volume != {names(q.images)[0].split("-")[0]}  # one other volume
        assert shuffled[0].images == shuffled[3].images  # rows about one volume still share one
        # the lone 5-slice volume gets 5 evenly spaced picks of a 3-slice one (0, .5, 1, 1.5, 2 rounded)
        assert [n.split("-")[1] for n in names(shuffled[4].images)] == [
            "1.png",
            "1.png",
            "2.png",
            "3.png",
            "3.png",
        ]
        assert shuffled[5].images == questions[5].images  # a longitudinal row is not a volume
    with pytest.raises(SchemaError, match="at least two different volumes .* found 1"):
        gen.shuffle_volumes(questions[:1] + questions[5:], seed=0)


def test_default_shuffle_is_unchanged_and_swaps_whole_image_lists(tmp_path):
    questions = gen.load_questions(multi_fixture(tmp_path), None, {})
    assert (
        gen.parse_args(["--model", "m", "--data", "d", "--output", "o", "--shuffle-images", "0"]).shuffle_role
        is None
    )
    assert gen.CONTROLS[None][0] is gen.shuffle_images
    shuffled = gen.shuffle_images(questions, seed=0)
    # lists of equal length are swapped whole: each pair gets the other pair, each volume the other volume
    assert [s.images for s in shuffled] == [questions[i].images for i in (1, 0, 3, 2)]
    with pytest.raises(SystemExit):
        gen.parse_args(["--model", "m", "--data", "d", "--output", "o", "--shuffle-role", "prior"])


# ---------------------------------------------------------------------------------------------------------------
# Generating with a tiny model
# ---------------------------------------------------------------------------------------------------------------


def generate(model_dir, data, output, *extra) -> dict:
    argv = ["--model", str(model_dir), "--data", str(data), "--output", str(output), "--max-new-tokens", "3"]
    return gen.run(gen.parse_args(argv + list(extra)))


def test_tiny_model_answers_multi_image_rows_and_controls_never_resume_into_real_runs(
    tiny_model_dir, tmp_path
):
    data = multi_fixture(tmp_path)
    real = tmp_path / "real.jsonl"
    assert generate(tiny_model_dir, data, real)["answered_now"] == 4
    rows = {r["id"]: r for r in map(json.loads, real.read_text().splitlines())}
    assert set(rows) == {"long0", "long1", "vol0", "vol1"}
    assert [rows[i]["n_images"] for i in sorted(rows)] == [2, 2, 3, 3]
    assert rows["long1"]["image_roles"] == ["prior", "current"] and rows["vol0"]["image_roles"] is None
    assert (rows["long1"]["answer"], rows["vol1"]["answer"]) == ("Yes", "No")  # the stated answers' verdicts
    assert all(isinstance(r["prediction"], str) and "error" not in r for r in rows.values())

    control = tmp_path / "prior.jsonl"
    assert (
        generate(tiny_model_dir, data, control, "--shuffle-images", "0", "--shuffle-role", "prior")[
            "answered_now"
        ]
        == 4
    )
    models = {json.loads(line)["model"] for line in control.read_text().splitlines()}
    assert models == {f"{tiny_model_dir} [prior images shuffled, seed 0]"}
    with pytest.raises(gen.PredictionsFileError, match="prior images shuffled"):
        generate(tiny_model_dir, data, real, "--shuffle-images", "0", "--shuffle-role", "prior")
    with pytest.raises(gen.PredictionsFileError, match="volumes shuffled, seed 1"):
        generate(tiny_model_dir, data, control, "--shuffle-images", "1", "--shuffle-role", "volume")

    report = sc.score_files([str(real)], tmp_path / "scored", names=["real"], n_boot=50)
    families = report["runs"]["real"]["by_image_family"]
    assert {f: families[f]["all"]["accuracy"]["n"] for f in families} == {"longitudinal": 2, "volume": 2}


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------

# id, answer, prediction, answer_type, question_type, n_images, image_roles
PREDICTIONS = [
    ("l1", "grown", "grown", "OPEN", "CHANGE", 2, ["prior", "current"]),
    (
        "l2",
        "Yes",
        "There are two new lesions on the current study. Yes.",
        "CLOSED",
        "NEW",
        2,
        ["prior", "current"],
    ),
    (
        "l3",
        "No",
        "The lesion has grown since the prior study. Yes.",
        "CLOSED",
        "GROWN",
        2,
        ["prior", "current"],
    ),
    ("l4", "2", "3", "OPEN", "NEW_COUNT", 2, ["prior", "current"]),
    ("v1", "3", "3", "OPEN", "VIS_COUNT", 5, None),
    ("v2", "2", "4", "OPEN", "LARGEST", 5, None),
    ("v3", "No", "There is no lesion in this volume. No.", "CLOSED", "PRES", 5, None),
    ("s1", "yes", "no", "CLOSED", "PRES", 1, None),
    ("s2", "liver", "the liver", "OPEN", "ORGAN", 1, None),
]


def write_predictions(path: Path, rows=PREDICTIONS, keep=("n_images", "image_roles")) -> Path:
    with path.open("w") as f:
        for rid, answer, prediction, answer_type, question_type, n_images, roles in rows:
            row = {"id": rid, "answer": answer, "prediction": prediction, "answer_type": answer_type}
            row |= {"question_type": question_type, "n_images": n_images, "image_roles": roles, "model": "m"}
            f.write(
                json.dumps({k: v for k, v in row.items() if k not in {"n_images", "image_roles"} - set(keep)})
            )
            f.write("\n")
    return path


def test_score_reports_new_question_types_and_image_families(tmp_path):
    report = sc.score_files([str(write_predictions(tmp_path / "p.jsonl"))], tmp_path / "out", names=["m"])
    run = report["runs"]["m"]

    def mean(entry, metric):
        return entry[metric]["mean"], entry[metric]["n"]

    types = run["by_question_type"]
    assert mean(types["CHANGE"]["OPEN"], "strict_exact_match") == (1.0, 1)
    assert mean(types["CHANGE"]["OPEN"], "llava_recall") == (1.0, 1)
    assert mean(types["NEW"]["CLOSED"], "strict_closed_accuracy") == (1.0, 1)  # scored on the verdict
    assert mean(types["NEW"]["CLOSED"], "llava_closed_accuracy") == (1.0, 1)
    assert mean(types["GROWN"]["CLOSED"], "strict_closed_accuracy") == (0.0, 1)
    assert mean(types["NEW_COUNT"]["OPEN"], "strict_token_f1") == (0.0, 1)
    assert mean(types["VIS_COUNT"]["OPEN"], "strict_exact_match") == (1.0, 1)
    assert mean(types["LARGEST"]["OPEN"], "llava_recall") == (0.0, 1)
    assert mean(types["PRES"]["CLOSED"], "accuracy") == (0.5, 2)  # v3 right, s1 wrong

    families = run["by_image_family"]
    assert list(families) == ["single image", "longitudinal", "volume"]
    assert run["without_image_family"] == 0
    assert mean(families["longitudinal"]["CLOSED"], "strict_closed_accuracy") == (0.5, 2)
    assert mean(families["longitudinal"]["OPEN"], "strict_exact_match") == (0.5, 2)
    assert mean(families["longitudinal"]["all"], "accuracy") == (0.5, 4)
    assert mean(families["volume"]["CLOSED"], "llava_closed_accuracy") == (1.0, 1)
    assert mean(families["volume"]["OPEN"], "llava_recall") == (0.5, 2)
    assert mean(families["volume"]["all"], "accuracy") == pytest.approx((2 / 3, 3))
    assert mean(families["single image"]["OPEN"], "llava_recall") == (1.0, 1)
    assert mean(families["single image"]["OPEN"], "strict_exact_match") == (1.0, 1)  # "the" is dropped
    assert mean(families["single image"]["all"], "accuracy") == (0.5, 2)

    table = (tmp_path / "out" / "metrics.md").read_text()
    assert (
        "### By image family" in table and "| GROWN | CLOSED | 1 | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] |" in table
    )
    assert "| longitudinal | all | 4 | - | 50.0 [" in table and "| volume | all | 3 | - | 66.7 [" in table
    assert table.index("| single image | CLOSED") < table.index("| longitudinal | CLOSED")


def test_single_image_runs_get_no_family_table_and_bad_image_fields_are_refused(tmp_path):
    single = [r for r in PREDICTIONS if r[0].startswith("s")]
    report = sc.score_files(
        [str(write_predictions(tmp_path / "s.jsonl", single))], tmp_path / "o1", names=["s"]
    )
    assert "by_image_family" not in report["runs"]["s"]
    assert "image family" not in (tmp_path / "o1" / "metrics.md").read_text()
    # files written before eval.generate recorded image counts: counted as without a family
    old = write_predictions(tmp_path / "old.jsonl", PREDICTIONS[:1] + single, keep=())
    mixed = sc.score_files(
        [f"{write_predictions(tmp_path / 'new.jsonl', PREDICTIONS[1:2])},{old}"], tmp_path / "o2"
    )
    (run,) = mixed["runs"].values()
    assert run["without_image_family"] == 3 and list(run["by_image_family"]) == ["longitudinal"]
    bad = [("x", "yes", "yes", "CLOSED", "PRES", 2, ["prior"])]
    with pytest.raises(SchemaError, match="'image_roles' has 1 entries for 2 image"):
        sc.read_predictions([write_predictions(tmp_path / "bad.jsonl", bad)])
    with pytest.raises(SchemaError, match="'n_images' must be a count"):
        sc.read_predictions(
            [write_predictions(tmp_path / "bad2.jsonl", [("x", "yes", "yes", "CLOSED", "P", -1, None)])]
        )
