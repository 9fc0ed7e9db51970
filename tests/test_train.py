"""Training entry points on a tiny Llava: stage freezing, resume after a kill, LoRA merge, DPO, GRPO, recipes.

Each run is a few steps on CPU. The distributed launches (DDP, ZeRO-2, ZeRO-3, two nodes) are in
tests/test_train_distributed.py (slow).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image, tiny_model
from safetensors.torch import load_file

from medllava.modeling import model_parts

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "train" / "recipes").rglob("*.yaml"))


# --- fixtures ------------------------------------------------------------------------------------------------


def _user(text):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model dir plus sft/dpo/grpo JSONL files with image paths relative to the files."""
    root = tmp_path_factory.mktemp("train-data")
    model, processor = tiny_model()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    # a 4-block tower: with vision_feature_layer -2, blocks 0-2 feed the features (block 3 does not)
    model, processor = tiny_model(vision_layers=4)
    model.save_pretrained(root / "model4")
    processor.save_pretrained(root / "model4")
    (root / "images").mkdir()
    answers = ["yes", "no", "a small nodule", "left lung"]
    sft, dpo, grpo = [], [], []
    for i in range(16):
        random_image(i, size=(40, 32)).save(root / "images" / f"{i}.png")
        image, answer = [f"images/{i}.png"], answers[i % 4]
        question = f"Question {i}: what is seen?"
        sft.append({"id": f"s{i}", "images": image, "messages": [_user(question), _assistant(answer)]})
        dpo.append(
            {
                "id": f"d{i}",
                "images": image,
                "prompt": [_user(question)],
                "chosen": [_assistant(answer)],
                "rejected": [_assistant("I cannot tell.")],
            }
        )
        grpo.append(
            {
                "id": f"g{i}",
                "images": image,
                "prompt": [_user(question)],
                "solution": answer,
                "answer_type": "CLOSED" if answer in ("yes", "no") else "OPEN",
            }
        )
    # a multi-turn conversation too
    sft.append(
        {
            "id": "multi",
            "images": ["images/0.png"],
            "messages": [
                _user("Describe it."),
                _assistant("An image."),
                {"role": "user", "content": [{"type": "text", "text": "And?"}]},
                _assistant("Nothing else."),
            ],
        }
    )
    return {
        "root": root,
        "model": root / "model",
        "model4": root / "model4",
        "sft": write_jsonl(root / "sft.jsonl", sft),
        "dpo": write_jsonl(root / "dpo.jsonl", dpo),
        "grpo": write_jsonl(root / "grpo.jsonl", grpo),
    }


COMMON = dict(
    per_device_train_batch_size=2,
    logging_steps=1,
    save_steps=2,
    bf16=False,
    gradient_checkpointing=False,
    learning_rate=1e-3,
    report_to="none",
    seed=0,
    lr_scheduler_type="constant",
    disable_tqdm=True,
)


def sft_args(
    data, out, stage="instruct", use_peft=False, max_steps=2, script=None, model_dir=None, **overrides
):
    """(ScriptArguments, SFTConfig, ModelConfig) of a short run; `script`: more ScriptArguments fields."""
    from train.configs import ModelConfig, ScriptArguments, SFTConfig

    script = ScriptArguments(train_file=str(data["sft"]), stage=stage, **(script or {}))
    training = SFTConfig(
        output_dir=str(out), max_steps=max_steps, **(COMMON | {"max_length": 256} | overrides)
    )
    model = ModelConfig(
        model_name_or_path=str(model_dir or data["model"]), use_peft=use_peft, lora_r=4, lora_alpha=8
    )
    return script, training, model


def run_sft(*args, **kwargs):
    from train.sft import main

    return main(*sft_args(*args, **kwargs))


def load_llava(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def changed_by_part(before, after) -> dict[str, tuple[int, int]]:
    """{part: (tensors changed, tensors)} between two Llava models."""
    out = {}
    for part, modules in model_parts(before).items():
        names = {n for m in modules for n, _ in m.named_parameters()}
        a_params = {id(p): p for m in modules for p in m.parameters()}
        b_params = {id(p): p for m in model_parts(after)[part] for p in m.parameters()}
        pairs = list(zip(a_params.values(), b_params.values(), strict=True))
        changed = sum(not torch.equal(x, y) for x, y in pairs)
        out[part] = (changed, len(pairs))
        assert len(names) >= 1
    return out


# --- recipes -------------------------------------------------------------------------------------------------


def test_every_recipe_parses():
    from train.configs import parse, recipe_algorithm

    assert len(RECIPES) >= 13, RECIPES
    for recipe in RECIPES:
        script, training, model = parse(recipe_algorithm(str(recipe)), ["--config", str(recipe)])
        assert script.train_file and training.output_dir, recipe
        if "lora" in recipe.name:
            assert model.use_peft, recipe


# Model names every recipe may start from (medllava.assets.resolve_model), and paths built outside the recipes,
# each with the command that builds it (docs/train.md must show that command).
MODEL_NAMES = {"base", "default", "starter"}
EXTERNAL_MODELS = {
    "outputs/cluster/base": "python -m train.build_base",
    "outputs/starter_v2/stage0_words": "make train-stage0",
}
# keys that only matter when the Trainer evaluates
EVAL_KEYS = ("eval_", "per_device_eval_batch_size")


def _recipe_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_recipes_have_their_own_output_dirs_and_start_from_a_known_model():
    recipes = {path: _recipe_yaml(path) for path in RECIPES}
    outputs = [spec["output_dir"] for spec in recipes.values()]
    shared = {out for out in outputs if outputs.count(out) > 1}
    # automatic resume would continue one recipe's run from another's checkpoints
    assert not shared, f"recipes share an output_dir: {shared}"
    docs = (REPO / "docs" / "train.md").read_text()
    for path, spec in recipes.items():
        start = spec["model_name_or_path"]
        others = set(outputs) - {spec["output_dir"]}
        if start in EXTERNAL_MODELS:
            assert EXTERNAL_MODELS[start] in docs and start in docs, (path.name, start)
        else:
            assert start in MODEL_NAMES or start in others, (
                f"{path}: model_name_or_path {start!r} is no recipe's output"
            )


def test_recipes_set_no_evaluation_keys_without_evaluation():
    from train.configs import parse, recipe_algorithm

    for path in RECIPES:
        spec = _recipe_yaml(path)
        script, training, _ = parse(recipe_algorithm(str(path)), ["--config", str(path)])
        evaluates = getattr(training.eval_strategy, "value", training.eval_strategy) != "no"
        eval_keys = [k for k in spec if k.startswith(EVAL_KEYS) and k != "eval_strategy"]
        if evaluates:
            assert script.eval_file, f"{path}: eval_strategy {training.eval_strategy} needs an eval_file"
        else:
            assert not eval_keys, f"{path}: {eval_keys} do nothing with eval_strategy 'no'"


def test_step_counts_in_recipe_comments_match_the_values():
    import math
    import re

    from train.configs import parse, recipe_algorithm

    checked = 0
    for path in RECIPES:
        script, training, _ = parse(recipe_algorithm(str(path)), ["--config", str(path)])
        rows_per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
        rows_per_step //= getattr(training, "num_generations", None) or 1
        if training.max_steps > 0:
            steps = training.max_steps
        elif script.max_train_samples:
            steps = math.ceil(script.max_train_samples / rows_per_step) * math.ceil(training.num_train_epochs)
        else:
            continue
        for line in path.read_text().splitlines():
            comment = line.partition("#")[2]
            for n, per_step in re.findall(r"(\d+) steps of (\d+)", comment):
                assert (int(n), int(per_step)) == (steps, rows_per_step), (path.name, line)
                checked += 1
    assert checked >= 6


def _make_dry_run_lines(*args) -> list[str]:
    """The commands `make -n` prints for these goals (recursive makes included), whitespace-normalised."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return [" ".join(line.split()) for line in proc.stdout.splitlines()]


def _make_dry_run(*args) -> list[str]:
    """The `accelerate launch` lines `make -n` prints for these goals."""
    return [line for line in _make_dry_run_lines(*args) if "accelerate launch" in line]


def _flag(command: str, name: str) -> str | None:
    words = command.split()
    return words[words.index(name) + 1] if name in words else None


def test_make_stage_targets_run_the_starter_chain():
    stages = ("train-stage1", "train-stage2", "train-stage3")
    starter = _make_dry_run("train-starter", "STARTER_OUT=/tmp/chain")
    one_by_one = _make_dry_run(*stages, "STARTER_OUT=/tmp/chain")
    assert len(starter) == len(stages) and starter == one_by_one
    # stage 0 (no accelerate: train.findings_words) runs first and writes what stage 1 starts from
    stage0 = _make_dry_run_lines("train-starter", "STARTER_OUT=/tmp/chain")
    (first,) = [line for line in stage0 if "train.findings_words" in line]
    assert stage0.index(first) < stage0.index(starter[0])
    previous = _flag(first, "--output")
    assert previous == "/tmp/chain/stage0_words"
    for command in starter:
        assert _flag(command, "--model_name_or_path") == previous, command
        previous = _flag(command, "--output_dir")
        assert previous.startswith("/tmp/chain/"), command
    # with the default STARTER_OUT the flags repeat what each recipe says: launching a recipe by hand is the same
    for command in _make_dry_run("train-starter"):
        spec = _recipe_yaml(REPO / _flag(command, "--config"))
        assert spec["output_dir"] == _flag(command, "--output_dir"), command
        assert spec["model_name_or_path"] == (_flag(command, "--model_name_or_path") or "base"), command
    # RECIPE: the recipe as written (its own model and output dir), OUTPUT_DIR still overrides
    cluster = "train/recipes/cluster/stage2_instruct.yaml"
    (command,) = _make_dry_run("train-stage2", f"RECIPE={cluster}", "OUTPUT_DIR=/tmp/o")
    assert _flag(command, "--config") == cluster and _flag(command, "--model_name_or_path") is None
    assert _flag(command, "--output_dir") == "/tmp/o"


def test_unknown_recipe_key_is_an_error(tmp_path):
    from train.configs import parse

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train_file: x.jsonl\noutput_dir: out\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse("sft", ["--config", str(recipe)])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage": "nope"}, "stage"),
        ({"train_file": None}, "train_file"),
        ({"malloc_trim_gib": 0}, "malloc_trim_gib"),
    ],
)
def test_script_arguments_are_validated(overrides, message):
    from train.configs import ScriptArguments

    with pytest.raises(ValueError, match=message):
        ScriptArguments(**({"train_file": "x.jsonl"} | overrides))


def test_sft_config_refuses_trl_assistant_only_loss(tmp_path):
    from train.configs import SFTConfig

    with pytest.raises(ValueError, match="AssistantOnlyCollator"):
        SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True)


# --- stages: exactly the intended parameters change ----------------------------------------------------------


@pytest.mark.parametrize(
    "stage, use_peft, expected",
    [
        ("align", False, {"vision": "none", "projector": "all", "llm": "none"}),
        ("instruct", False, {"vision": "none", "projector": "all", "llm": "all"}),
        ("specialist", True, {"vision": "none", "projector": "all", "llm": "lora"}),
    ],
)
def test_stage_trains_exactly_its_parts(data, tmp_path, stage, use_peft, expected):
    report = run_sft(data, tmp_path / "out", stage=stage, use_peft=use_peft)
    assert report["train"]["kept"] == 17
    before, after = load_llava(data["model"]), load_llava(tmp_path / "out")  # plain transformers reload
    changed = changed_by_part(before, after)
    for part, want in expected.items():
        n_changed, n = changed[part]
        if want == "none":
            assert n_changed == 0, (part, changed)
        elif want == "all":
            assert n_changed == n, (part, changed)
    if expected["llm"] == "lora":  # merged LoRA: exactly the adapted linear weights of the LLM moved
        b, a = dict(before.named_parameters()), dict(after.named_parameters())
        lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for name in b:
            if ".language_model." in name or name.startswith("lm_head"):
                moved = not torch.equal(b[name], a[name])
                assert moved == name.endswith(tuple(f"{t}.weight" for t in lora_targets)), name
        adapter = tmp_path / "out" / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (
            adapter / "adapter_model.safetensors"
        ).is_file()
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_lora_merge_equals_base_plus_adapter(data, tmp_path):
    from peft import PeftModel

    run_sft(data, tmp_path / "out", use_peft=True)
    merged = load_llava(tmp_path / "out").eval()
    base_plus_adapter = PeftModel.from_pretrained(
        load_llava(data["model"]), tmp_path / "out" / "adapter"
    ).eval()
    ids = torch.tensor([[1, 200, 300, 400, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, base_plus_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_over_long_rows_are_dropped_and_counted(data):
    from transformers import AutoProcessor

    from medllava.schema import read_rows, token_length
    from train.data import get_dataset

    processor = AutoProcessor.from_pretrained(data["model"])
    lengths = [token_length(row, processor) for row in read_rows(data["sft"])]
    limit = max(lengths) - 1  # the multi-turn row is the longest
    script, _, _ = sft_args(data, "unused")
    dataset, report = get_dataset(data["sft"], processor, script, limit, "sft")
    assert report["dropped_too_long"] == sum(n > limit for n in lengths) >= 1
    assert len(dataset) == report["kept"] == len(lengths) - report["dropped_too_long"]
    assert "multi" not in dataset["id"]
    # the kept rows' token counts, for train_sampling_strategy: group_by_length
    assert dataset["length"] == [n for n in lengths if n <= limit]


def test_length_column_name_is_honoured_and_a_clashing_row_field_is_refused(data, tmp_path):
    from transformers import AutoProcessor

    from medllava.schema import SchemaError, read_rows
    from train.data import get_dataset

    processor = AutoProcessor.from_pretrained(data["model"])
    script, _, _ = sft_args(data, "unused")
    dataset, _ = get_dataset(data["sft"], processor, script, None, "sft", length_column="n_tokens")
    assert "n_tokens" in dataset.column_names and "length" not in dataset.column_names
    # a row that carries its own `length` field (e.g. a report's length) must not be overwritten or crash in datasets
    rows = list(read_rows(data["sft"]))
    rows[0]["length"] = "long report"
    clash = tmp_path / "clash.jsonl"
    for row in rows:  # images stay where the fixture put them
        row["images"] = [str(Path(data["sft"]).parent / image) for image in row.get("images", [])]
    clash.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # the images are outside clash.jsonl's folder: allowed explicitly
    script.allow_root = [str(data["root"])]
    with pytest.raises(SchemaError, match="already have a 'length' field"):
        get_dataset(clash, processor, script, None, "sft")
    renamed, _ = get_dataset(clash, processor, script, None, "sft", length_column="n_tokens")
    assert renamed["length"][0] == "long report"


def test_answer_suffix_matches_the_eval_prompt(data):
    from eval.generate import load_questions
    from medllava.prompts import ANSWER_SUFFIXES, add_answer_suffix

    def user_text(messages):
        return messages[-1]["content"][-1]["text"]

    vqa = {"id": "v", "images": ["a.png"], "answer_type": "CLOSED"}
    vqa["messages"] = [_user("Is there a lesion?"), _assistant("yes")]
    once = add_answer_suffix(vqa)
    assert user_text(once["messages"][:1]) == "Is there a lesion? " + ANSWER_SUFFIXES["CLOSED"]
    assert (
        add_answer_suffix(once) == once and vqa["messages"][0]["content"][-1]["text"] == "Is there a lesion?"
    )
    pair = {"prompt": [_user("Which side?")], "chosen": [_assistant("left")], "answer_type": "OPEN"}
    assert user_text(add_answer_suffix(pair)["prompt"]) == "Which side? " + ANSWER_SUFFIXES["OPEN"]
    caption = {"messages": [_user("Describe the image.")]}
    assert add_answer_suffix(caption) == caption  # no answer type: left alone

    path = data["root"] / "vqa.jsonl"
    path.write_text(json.dumps({**vqa, "images": ["images/0.png"]}) + "\n")
    asked = load_questions(path, None, ANSWER_SUFFIXES)[0].messages
    assert asked[-1] == once["messages"][0]  # the training prompt is the one eval asks


def test_bad_row_is_an_error_naming_the_line(data, tmp_path):
    from medllava.schema import SchemaError
    from train.data import load_rows

    lines = data["sft"].read_text().splitlines()
    bad = json.loads(lines[2])
    bad["images"] = ["images/missing.png"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(SchemaError, match=r"bad.jsonl:3: image not found"):
        load_rows(path, image_root=data["root"])


def _rows_with_bad_images(data, tmp_path, kind: str) -> Path:
    """The fixture's first five `kind` rows, rows 2, 4 and 5 naming a corrupt PNG, a missing file and a cut PNG."""
    (tmp_path / "images").mkdir(exist_ok=True)
    rows = [json.loads(line) for line in data[kind].read_text().splitlines()[:5]]
    for row in rows:
        for image in row["images"]:
            (tmp_path / image).write_bytes((data["root"] / image).read_bytes())
    good = (tmp_path / rows[0]["images"][0]).read_bytes()
    (tmp_path / "images" / "garbage.png").write_bytes(good[:16] + b"not image data" * 64)
    (tmp_path / "images" / "cut.png").write_bytes(good[: len(good) // 3])
    for i, image in ((1, "garbage.png"), (3, "missing.png"), (4, "cut.png")):
        rows[i]["images"] = [f"images/{image}"]
    return write_jsonl(tmp_path / f"bad_{kind}.jsonl", rows)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_every_row_with_an_unreadable_image_is_named_before_training(data, tmp_path, kind):
    from transformers import AutoProcessor

    from medllava.schema import SchemaError
    from train.data import get_dataset

    path = _rows_with_bad_images(data, tmp_path, kind)
    processor = AutoProcessor.from_pretrained(data["model"])
    script, _, _ = sft_args(data, "unused")
    with pytest.raises(SchemaError) as error:
        get_dataset(path, processor, script, None, kind, load_images=kind != "sft")
    message = str(error.value)
    assert "3 of 5 rows" in message, message
    assert f"bad_{kind}.jsonl:2: image does not decode" in message
    assert f"bad_{kind}.jsonl:4: image not found" in message
    assert f"bad_{kind}.jsonl:5: image does not decode" in message
    assert f"bad_{kind}.jsonl:1:" not in message and f"bad_{kind}.jsonl:3:" not in message


def test_sft_stops_on_a_corrupt_image_before_the_first_step(data, tmp_path):
    from medllava.schema import SchemaError
    from train.sft import main

    script, training, model = sft_args(data, tmp_path / "out")
    script.train_file = str(_rows_with_bad_images(data, tmp_path, "sft"))
    with pytest.raises(SchemaError, match=r"bad_sft.jsonl:2: image does not decode"):
        main(script, training, model)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# --- resume after a kill --------------------------------------------------------------------------------------

KILL_SCRIPT = """
import os
from transformers import TrainerCallback
from trl import TrlParser
from train.configs import ModelConfig, ScriptArguments, SFTConfig
from train.sft import main

class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os._exit(17)  # a hard kill: no cleanup, no final save

main(*TrlParser((ScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(), callbacks=[KillAtStep()])
"""


def _cli(script, training, model, **extra) -> list[str]:
    args = [
        "--train_file",
        script.train_file,
        "--stage",
        script.stage,
        "--model_name_or_path",
        model.model_name_or_path,
        "--output_dir",
        training.output_dir,
        "--max_steps",
        str(training.max_steps),
        "--max_length",
        str(training.max_length),
    ]
    for key, value in COMMON.items():
        args += [f"--{key}", str(value)]
    if model.use_peft:
        args += ["--use_peft", "true", "--lora_r", str(model.lora_r), "--lora_alpha", str(model.lora_alpha)]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def _losses(report) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in report["log_history"] if "loss" in e}


@pytest.mark.parametrize(
    "use_peft,sampling,vision_blocks",
    [
        (False, "random", 0),
        (False, "group_by_length", 0),  # batches of similar length (the starter's stage 3)
        pytest.param(True, "random", 0, marks=pytest.mark.slow),
        pytest.param(True, "group_by_length", 0, marks=pytest.mark.slow),
        # the tower's last block in full beside LoRA: PEFT modules_to_save, restored from the adapter
        pytest.param(True, "random", 1, marks=pytest.mark.slow),
    ],
    ids=["full", "full-grouped", "lora", "lora-grouped", "lora-tower"],
)
def test_resume_after_kill_matches_uninterrupted_run(data, tmp_path, use_peft, sampling, vision_blocks):
    extra = {"train_sampling_strategy": sampling}
    tower = (
        {"script": {"vision_train_blocks": vision_blocks}, "model_dir": data["model4"]}
        if vision_blocks
        else {}
    )
    uninterrupted = run_sft(data, tmp_path / "full", max_steps=4, use_peft=use_peft, **tower, **extra)

    killed = tmp_path / "killed"
    script = tmp_path / "kill_sft.py"
    script.write_text(KILL_SCRIPT)
    env = os.environ | {"KILL_AT_STEP": "3"}
    command = [
        sys.executable,
        str(script),
        *_cli(*sft_args(data, killed, max_steps=4, use_peft=use_peft, **tower), **extra),
    ]
    if vision_blocks:
        command += ["--vision_train_blocks", str(vision_blocks)]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (killed / "model.safetensors").exists()

    # the same command again: it resumes from checkpoint-2
    resumed = run_sft(data, killed, max_steps=4, use_peft=use_peft, **tower, **extra)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    full_losses, resumed_losses = _losses(uninterrupted), _losses(resumed)
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    # steps 3-4 ran after the resume: equal only if weights, optimizer and data position were restored
    for step in (1, 2, 3, 4):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_checkpoints_are_atomic_and_a_corrupt_last_one_falls_back(data, tmp_path, caplog):
    from train.checkpoints import COMPLETE_MARKER, find_checkpoint

    out = tmp_path / "out"
    run_sft(data, out, max_steps=4)
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file() and (
        out / "checkpoint-4" / COMPLETE_MARKER
    ).is_file()
    assert not (out / ".staging").exists()
    assert find_checkpoint(out) == str(out / "checkpoint-4")

    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING, logger="medllava.train"):
        assert find_checkpoint(out) == str(out / "checkpoint-2")
    assert "checkpoint-4 is unusable" in caplog.text

    (out / "checkpoint-6").mkdir()  # a directory without the completion marker (killed during the write)
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    assert find_checkpoint(out) == str(out / "checkpoint-2")
    assert find_checkpoint(out, "no") is None
    with pytest.raises(ValueError, match="cannot resume"):
        find_checkpoint(out, str(out / "checkpoint-4"))


# --- DPO and GRPO ---------------------------------------------------------------------------------------------


def test_dpo_trains_and_reloads(data, tmp_path):
    from train.configs import DPOConfig, ModelConfig, ScriptArguments
    from train.dpo import main

    script = ScriptArguments(train_file=str(data["dpo"]), stage="preference")
    training = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, max_length=256, beta=0.1, **COMMON)
    report = main(script, training, ModelConfig(model_name_or_path=str(data["model"])))
    losses = _losses(report)
    assert len(losses) == 2 and all(v == v for v in losses.values())
    changed = changed_by_part(load_llava(data["model"]), load_llava(tmp_path / "out"))
    assert changed["vision"][0] == 0 and changed["projector"][0] > 0 and changed["llm"][0] > 0


def test_grpo_trains_with_rewards_and_reloads(data, tmp_path):
    from train.configs import GRPOConfig, GRPOScriptArguments, ModelConfig
    from train.grpo import main

    script = GRPOScriptArguments(
        train_file=str(data["grpo"]), stage="preference", reward_funcs=["format", "accuracy", "open_f1"]
    )
    common = COMMON | {"per_device_train_batch_size": 4}
    training = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        num_generations=2,
        max_completion_length=8,
        reward_weights=[0.5, 1.0, 0.5],
        **common,
    )
    report = main(script, training, ModelConfig(model_name_or_path=str(data["model"])))
    rewards = [e for e in report["log_history"] if "reward" in e]
    assert len(rewards) == 2
    assert any("rewards/accuracy/mean" in k for k in rewards[0]), rewards[0].keys()
    reloaded = load_llava(tmp_path / "out")
    assert reloaded.config.model_type == "llava"


# --- QLoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_merges_into_a_plain_checkpoint(data, tmp_path):
    """bitsandbytes 0.50 runs NF4 4-bit layers on CPU: the LLM is quantized, projector and vision tower are not."""
    from train.configs import ModelConfig
    from train.models import get_model
    from train.sft import main

    # TRL casts trainable weights of a quantized model to bf16 (QLoRA paper), so bf16 autocast as in the recipe
    script, training, _ = sft_args(data, tmp_path / "out", stage="specialist", use_peft=True, bf16=True)
    model_args = ModelConfig(
        model_name_or_path=str(data["model"]),
        use_peft=True,
        load_in_4bit=True,
        use_bnb_nested_quant=True,
        lora_r=4,
        lora_alpha=8,
    )
    model, _ = get_model(model_args, script, training)
    base = model.get_base_model()
    assert type(base.model.language_model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    for part in (base.model.multi_modal_projector, base.model.vision_tower):
        assert all(type(m).__name__ != "Linear4bit" for m in part.modules())
    del model, base

    report = main(script, training, model_args)
    assert len(_losses(report)) == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # merged into the reloaded full-precision base
    changed = changed_by_part(load_llava(data["model"]), load_llava(tmp_path / "out"))
    assert (
        changed["vision"][0] == 0
        and changed["projector"][0] == changed["projector"][1]
        and changed["llm"][0] > 0
    )
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="paged 8-bit AdamW and bf16 4-bit compute of the cluster "
    "QLoRA recipe need a CUDA GPU; the CPU test above covers quantized loading, LoRA and the merge",
)
def test_cluster_qlora_recipe_on_gpu(data, tmp_path):
    from train.configs import parse
    from train.sft import main

    recipe = REPO / "train" / "recipes" / "cluster" / "stage3_specialist_qlora.yaml"
    script, training, model = parse(
        "sft",
        [
            "--config",
            str(recipe),
            "--model_name_or_path",
            str(data["model"]),
            "--train_file",
            str(data["sft"]),
            "--output_dir",
            str(tmp_path / "o"),
            "--max_steps",
            "2",
            "--report_to",
            "none",
        ],
    )
    assert len(_losses(main(script, training, model))) == 2


def test_answer_suffix_on_every_turn_of_a_grouped_row():
    from medllava.prompts import ANSWER_SUFFIXES, add_answer_suffix

    row = {"id": "g", "images": ["a.png"], "answer_types": ["OPEN", "CLOSED"]}
    row["messages"] = [_user("Which side?"), _assistant("left"), _user("Is it large?"), _assistant("no")]
    out = add_answer_suffix(row)
    users = [m["content"][-1]["text"] for m in out["messages"] if m["role"] == "user"]
    assert users == ["Which side? " + ANSWER_SUFFIXES["OPEN"], "Is it large? " + ANSWER_SUFFIXES["CLOSED"]]
    assert add_answer_suffix(out) == out and row["messages"][0]["content"][-1]["text"] == "Which side?"
    assert [m["content"][-1]["text"] for m in out["messages"] if m["role"] == "assistant"] == ["left", "no"]


def test_projector_lr_is_the_projectors_own(data, tmp_path):
    # learning_rate 0 for everything but the projector: only the projector may change
    run_sft(data, tmp_path / "out", stage="instruct", learning_rate=0.0, projector_lr=1e-2)
    changed = changed_by_part(load_llava(data["model"]), load_llava(tmp_path / "out"))
    assert changed["llm"][0] == 0 and changed["vision"][0] == 0, changed
    assert changed["projector"][0] == changed["projector"][1] > 0, changed


def test_fused_head_scores_only_labelled_positions_on_cpu_with_the_same_loss(monkeypatch):
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    from medllava.processing import AssistantOnlyCollator
    from train.trl_lm_head_patch import score_labelled_positions_only

    model, processor = tiny_model()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    rows = [
        {"images": [random_image(i)], "messages": [_user("What is it?"), _assistant("a scan" * (i + 1))]}
        for i in range(3)
    ]
    batch = AssistantOnlyCollator(processor)(rows)
    rows_projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows_projected.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    # TRL's own test, whatever an earlier in-process training run switched (restored after the test)
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)
    full = model(**batch, fused_lm_head=True)
    assert score_labelled_positions_only() and score_labelled_positions_only()  # idempotent
    compact = model(**batch, fused_lm_head=True)
    assert not score_labelled_positions_only(enabled=False)  # TRL's own test is back
    model(**batch, fused_lm_head=True)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["labels"][:, 1:].numel()
    assert rows_projected == [positions, labelled, positions] and labelled < positions / 2
    for name in ("loss", "log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(compact, name), getattr(full, name), rtol=1e-5, atol=1e-6)


def test_lm_head_patch_is_off_with_a_warning_on_another_trl_version(monkeypatch, caplog):
    import trl
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    from train.trl_lm_head_patch import WRITTEN_FOR_TRL, score_labelled_positions_only

    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)
    assert trl.__version__ == WRITTEN_FOR_TRL, "pyproject.toml pins the TRL the patch was written for"
    assert score_labelled_positions_only() and trl_utils._use_triton is not chunked_logprob._use_triton
    monkeypatch.setattr(trl, "__version__", "99.0.0")
    with caplog.at_level(logging.WARNING, logger="medllava.train"):
        assert not score_labelled_positions_only()
    # TRL's own test is back, and the warning says why
    assert trl_utils._use_triton is chunked_logprob._use_triton
    assert f"written for trl {WRITTEN_FOR_TRL}, this is trl 99.0.0" in caplog.text


def test_malloc_trim_runs_only_above_the_resident_limit(caplog):
    from types import SimpleNamespace

    from train.run import MallocTrimCallback, resident_bytes

    assert resident_bytes() > 2**20
    state = SimpleNamespace(global_step=3)
    never = MallocTrimCallback(limit_gib=1e6)
    never.on_step_end(None, state, None)
    assert never.trims == 0
    always = MallocTrimCallback(limit_gib=1e-6)
    garbage = [bytearray(2**16) for _ in range(2000)]  # ~130 MB of small heap blocks, then freed
    del garbage
    with caplog.at_level(logging.INFO, logger="medllava.train"):
        always.on_step_end(None, state, None)
    assert always.trims == 1 and "step 3: resident" in caplog.text and "malloc_trim ->" in caplog.text


# --- the vision tower: which blocks train, their own learning rate, with and without LoRA ------------------------

TOWER_BLOCKS = "model.vision_tower.encoder.layer"
TOWER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def moved(before, after) -> set[str]:
    """Names of the parameters that differ between two Llava models."""
    after = dict(after.named_parameters())
    return {name for name, p in before.named_parameters() if not torch.equal(p, after[name])}


def block_tensors(model, blocks, linear_weights=False) -> set[str]:
    """Parameter names of the tower's blocks `blocks` (only their LoRA-able linear weights if asked)."""
    names = {
        n for n, _ in model.named_parameters() if n.startswith(tuple(f"{TOWER_BLOCKS}.{i}." for i in blocks))
    }
    if linear_weights:
        names = {n for n in names if n.endswith(tuple(f"{layer}.weight" for layer in TOWER_LINEARS))}
    return names


def _part(names, part: str) -> set[str]:
    return {n for n in names if f".{part}." in f".{n}"}


def test_vision_lr_trains_exactly_the_last_blocks_at_a_new_image_size(data, tmp_path):
    from transformers import AutoProcessor

    from medllava.processing import image_token_count

    # stage 1 with the tower's last 2 feeding blocks (1, 2 of 0-3) at 42 px; every other rate is 0
    report = run_sft(
        data,
        tmp_path / "out",
        stage="align",
        model_dir=data["model4"],
        learning_rate=0.0,
        vision_lr=1e-2,
        script={"vision_train_blocks": 2, "image_size": 42},
    )
    before, after = load_llava(data["model4"]), load_llava(tmp_path / "out")
    chosen = block_tensors(before, (1, 2))
    assert moved(before, after) == chosen  # block 0 below them, block 3 above, projector at rate 0: unchanged
    params = dict(before.named_parameters())
    assert report["trainable"]["vision"] == sum(params[n].numel() for n in chosen)
    assert report["trainable"]["projector"] > 0 and report["trainable"]["llm"] == 0
    # the processor was resized at load and saved with the model: 3 x 3 patches
    assert image_token_count(AutoProcessor.from_pretrained(tmp_path / "out")) == 9
    assert after.config.image_seq_length == 9


def test_vision_blocks_in_full_beside_lora_on_the_llm_ship_in_the_delta(data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from medllava.modeling import apply_delta, save_delta

    out = tmp_path / "out"
    run_sft(
        data,
        out,
        stage="specialist",
        use_peft=True,
        model_dir=data["model4"],
        vision_lr=1e-2,
        script={"vision_train_blocks": 1},
    )
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert f"{TOWER_BLOCKS}.2" in adapter_config["modules_to_save"]
    before, after = load_llava(data["model4"]), load_llava(out)  # merged: plain transformers
    changed = moved(before, after)
    assert _part(changed, "vision_tower") == block_tensors(before, (2,))
    assert _part(changed, "multi_modal_projector") == _part(
        dict(before.named_parameters()), "multi_modal_projector"
    )
    llm = _part(changed, "language_model")
    assert llm and all(n.endswith(tuple(f"{t}.weight" for t in LLM_LORA_TARGETS)) for n in llm), llm
    # the delta over the starting model carries the tower's change: base + delta rebuilds the trained weights
    sizes = save_delta(before, after, tmp_path / "delta")
    assert block_tensors(before, (2,)) <= set(sizes)
    apply_delta(data["model4"], tmp_path / "delta", tmp_path / "rebuilt")
    rebuilt = LlavaForConditionalGeneration.from_pretrained(tmp_path / "rebuilt").state_dict()
    for name, value in after.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_vision_lora_beside_lora_on_the_llm(data, tmp_path):
    run_sft(
        data,
        tmp_path / "out",
        stage="specialist",
        use_peft=True,
        model_dir=data["model4"],
        vision_lr=1e-2,
        script={"vision_train_blocks": 2, "vision_train_mode": "lora"},
    )
    before, after = load_llava(data["model4"]), load_llava(tmp_path / "out")
    changed = moved(before, after)
    # merged LoRA: exactly the linear weights of blocks 1 and 2 moved in the tower (no bias, no norm)
    assert _part(changed, "vision_tower") == block_tensors(before, (1, 2), linear_weights=True)
    assert _part(changed, "language_model")


def test_vision_lora_in_stage_align_leaves_the_llm_alone(data, tmp_path):
    out = tmp_path / "out"
    run_sft(
        data,
        out,
        stage="align",
        model_dir=data["model4"],
        script={"vision_train_blocks": 1, "vision_train_mode": "lora"},
    )
    before, after = load_llava(data["model4"]), load_llava(out)
    params = dict(before.named_parameters())
    assert moved(before, after) == _part(params, "multi_modal_projector") | block_tensors(
        before, (2,), linear_weights=True
    )
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "stage, use_peft, script, message",
    [
        ("instruct", False, {"vision_train_blocks": 1, "vision_train_mode": "lora"}, "set use_peft"),
        ("align", True, {}, "LoRA on the LLM does not apply"),
        ("align", False, {"vision_train_blocks": 4}, "only 3 of the tower's 4 blocks feed the features"),
        ("align", False, {"image_size": 50}, "not a positive multiple of the patch size 14"),
    ],
)
def test_impossible_tower_settings_are_clear_errors(data, tmp_path, stage, use_peft, script, message):
    from train.models import get_model

    script, training, model = sft_args(
        data, tmp_path, stage=stage, use_peft=use_peft, model_dir=data["model4"], script=script
    )
    with pytest.raises(ValueError, match=message):
        get_model(model, script, training)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_train_blocks": -2}, "-1 \\(all\\), 0 \\(frozen\\)"),
        ({"vision_train_mode": "partial"}, "mode must be one of"),
        ({"train_vision": True, "vision_train_blocks": 2}, "train_vision .* contradicts"),
        ({"image_size": 0}, "image_size must be > 0"),
        ({"mix_files": ["a.jsonl"]}, "mix_fractions has 0 value"),
        ({"mix_files": ["a.jsonl", "b.jsonl"], "mix_fractions": [0.5, 0.5]}, "their sum below 1"),
    ],
)
def test_tower_and_mix_arguments_are_validated(overrides, message):
    from train.configs import ScriptArguments

    with pytest.raises(ValueError, match=message):
        ScriptArguments(**({"train_file": "x.jsonl"} | overrides))


def test_vision_training_follows_the_stage_unless_the_recipe_says(tmp_path):
    from medllava.modeling import VisionTraining
    from train.configs import ScriptArguments, SFTConfig

    assert ScriptArguments(train_file="x", stage="align").vision_training() == VisionTraining(0)
    assert ScriptArguments(train_file="x", train_vision=True).vision_training() == VisionTraining(-1, "full")
    lora = ScriptArguments(train_file="x", vision_train_blocks=3, vision_train_mode="lora")
    assert lora.vision_training() == VisionTraining(3, "lora")
    with pytest.raises(ValueError, match="vision_lr must be >= 0"):
        SFTConfig(output_dir=str(tmp_path), vision_lr=-1.0)


def test_dpo_trains_the_chosen_vision_block_at_its_own_rate(data, tmp_path):
    from train.configs import DPOConfig, ModelConfig, ScriptArguments
    from train.dpo import main

    script = ScriptArguments(train_file=str(data["dpo"]), stage="preference", vision_train_blocks=1)
    training = DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, max_length=256, beta=0.1, vision_lr=1e-2, **COMMON
    )
    main(script, training, ModelConfig(model_name_or_path=str(data["model4"])))
    before, after = load_llava(data["model4"]), load_llava(tmp_path / "out")
    changed = moved(before, after)
    assert _part(changed, "vision_tower") == block_tensors(before, (2,))
    assert _part(changed, "language_model") and _part(changed, "multi_modal_projector")


def test_grpo_accepts_vision_lora_beside_lora_on_the_llm(data, tmp_path):
    from train.configs import GRPOConfig, GRPOScriptArguments, ModelConfig
    from train.grpo import main

    script = GRPOScriptArguments(
        train_file=str(data["grpo"]), stage="preference", vision_train_blocks=1, vision_train_mode="lora"
    )
    training = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        num_generations=2,
        max_completion_length=8,
        vision_lr=1e-2,
        **(COMMON | {"per_device_train_batch_size": 4}),
    )
    model = ModelConfig(model_name_or_path=str(data["model4"]), use_peft=True, lora_r=4, lora_alpha=8)
    report = main(script, training, model)
    # LoRA r 4 on block 2's q/k/v/o_proj (32 -> 32), fc1 (32 -> 64) and fc2 (64 -> 32)
    assert report["trainable"]["vision"] == 4 * 4 * (32 + 32) + 4 * (32 + 64) + 4 * (64 + 32)
    before, after = load_llava(data["model4"]), load_llava(tmp_path / "out")
    # GRPO moves a tensor only where rewards differ within a group; whatever moved in the tower is block 2's
    assert _part(moved(before, after), "vision_tower") <= block_tensors(before, (2,), linear_weights=True)


# --- several training files ----------------------------------------------------------------------------------


def test_mix_files_add_their_share_of_rows(data, tmp_path):
    from transformers import AutoProcessor

    from medllava.schema import SchemaError
    from train.data import get_datasets

    captions = [
        {
            "id": f"c{i}",
            "images": [f"images/{i}.png"],
            "messages": [_user("Describe the image."), _assistant(f"Caption {i}.")],
            "modality": "CT",
        }
        for i in range(5)
    ]
    path = write_jsonl(data["root"] / "captions_mix.jsonl", captions)
    processor = AutoProcessor.from_pretrained(data["model"])
    script, _, _ = sft_args(data, "unused", script={"mix_files": [str(path)], "mix_fractions": [0.2]})
    train, _, report = get_datasets(script, processor, 256, "sft")
    # 17 rows of train_file are 80%: 0.2 / 0.8 x 17 = 4.25 -> the first 4 caption rows
    assert report["train"]["kept"] == 17 and len(train) == 21
    assert train["id"][17:] == ["c0", "c1", "c2", "c3"]
    assert report["train"]["mixed"][0] | {"file": None} == {
        "file": None,
        "rows": 4,
        "kept": 4,
        "dropped_too_long": 0,
        "fraction": 0.2,
        "used": 4,
        "passes": 1.0,
    }
    # a field only the mixed rows have is a column (None for the others); lengths for every row
    assert train["modality"][:17] == [None] * 17 and train["modality"][17] == "CT"
    assert len(train["length"]) == 21 and all(n > 0 for n in train["length"])
    # more than the file has: its rows repeat, in order
    script.mix_fractions = [0.5]
    train, _, report = get_datasets(script, processor, 256, "sft")
    assert (
        train["id"][17:] == [f"c{i % 5}" for i in range(17)] and report["train"]["mixed"][0]["passes"] == 3.4
    )
    script.mix_files = [str(data["dpo"])]
    with pytest.raises(SchemaError, match="sft rows expected"):
        get_datasets(script, processor, 256, "sft")


# --- the starter_v2 recipes (make train-starter) -----------------------------------------------------------------


def test_starter_v2_recipes_train_the_tower_and_replay_captions_and_conversations():
    from medllava.modeling import VisionTraining
    from train.configs import parse

    v2 = REPO / "train" / "recipes" / "starter_v2"
    stage1, _, model1 = parse("sft", ["--config", str(v2 / "stage1_align_tower.yaml")])
    assert stage1.stage == "align" and stage1.image_size in (112, 168, 224) and not model1.use_peft
    assert stage1.vision_training().trains
    assert model1.model_name_or_path == "outputs/starter_v2/stage0_words"  # make train-stage0
    stage2, training2, model2 = parse("sft", ["--config", str(v2 / "stage2_instruct_lora_tower.yaml")])
    assert model2.model_name_or_path == "outputs/starter_v2/stage1_align_tower" and model2.use_peft
    assert stage2.vision_training().trains and training2.vision_lr
    stage3, _, model3 = parse("sft", ["--config", str(v2 / "stage3_specialist_replay.yaml")])
    assert model3.model_name_or_path == "outputs/starter_v2/stage2_instruct_lora_tower"
    assert stage3.vision_training() == VisionTraining(stage3.vision_train_blocks, "lora")
    assert [Path(f).name for f in stage3.mix_files] == ["captions_train.jsonl", "instruct_train.jsonl"]
    assert stage3.image_size is None  # the side comes with stage 1's saved processor
    # the findings as words run beside the LM loss in every stage after stage 0
    assert all((s.findings_loss, s.findings_heads) == (1.0, "words") for s in (stage1, stage2, stage3))
    # the starter chain trains them
    chain = _make_dry_run("train-starter")
    assert [_flag(command, "--config") for command in chain] == [
        f"train/recipes/starter_v2/{name}.yaml"
        for name in ("stage1_align_tower", "stage2_instruct_lora_tower", "stage3_specialist_replay")
    ]


# --- the auxiliary findings loss (train/findings.py) ---------------------------------------------------------


def _write_instances(root: Path, n: int) -> None:
    modalities, counts = ["CT", "MRI"], [0, 1, 2, 3]
    rows = []
    for i in range(n):
        count = counts[i % 4]
        lesion = {"side": "left", "position": "upper", "size": "small", "contrast": "dark"} if count else {}
        rows.append(
            {"image": f"images/{i}.png", "modality": modalities[i % 2], "region": "head", "count": count}
            | {k: lesion.get(k) for k in ("side", "position", "size", "contrast")}
        )
    write_jsonl(root / "instances_train.jsonl", rows)


def test_findings_labels_follow_the_instances_and_unknown_images_add_nothing(data, tmp_path):
    from train.findings import FACTS, FindingsLabels

    with pytest.raises(FileNotFoundError, match="instances_"):
        FindingsLabels([tmp_path / "sft.jsonl"])
    _write_instances(data["root"], 16)
    labels = FindingsLabels([data["sft"]])
    assert labels.classes["count"] == ["0", "1", "2", "3"] and labels.classes["present"] == ["no", "yes"]
    assert labels.classes["side"] == ["left", "none"]
    got = dict(zip(FACTS, labels(str(data["root"] / "images" / "3.png")), strict=True))
    assert got["modality"] == labels.classes["modality"].index("MRI") and got["count"] == 3
    assert got["present"] == 1 and got["side"] == 0
    assert dict(zip(FACTS, labels(str(data["root"] / "images" / "4.png")), strict=True))["side"] == 1
    assert labels(str(tmp_path / "elsewhere.png")) == [-100] * len(FACTS)


@pytest.mark.parametrize("heads", ["linear", "words"])
def test_findings_loss_trains_the_projector_through_its_heads_and_saves_a_plain_llava(data, tmp_path, heads):
    from transformers import LlavaForConditionalGeneration

    _write_instances(data["root"], 16)
    script = {"findings_loss": 1.0, "findings_heads": heads}
    report = run_sft(data, tmp_path / "out", stage="align", max_steps=3, script=script)
    logged = [h["findings_loss"] for h in report["log_history"] if "findings_loss" in h]
    assert len(logged) == 3 and all(v > 0 for v in logged)
    base, after = load_llava(data["model"]), load_llava(tmp_path / "out")
    assert type(after) is LlavaForConditionalGeneration
    assert set(after.state_dict()) == set(base.state_dict())  # no head weights in the checkpoint
    assert changed_by_part(base, after)["projector"][0] > 0


def test_findings_heads_gradients_are_zeroed_after_every_optimizer_step(data, tmp_path):
    # the Trainer zeroes only the model's gradients; the heads' must not add up from step to step
    from train.findings import FACTS, FindingsHeads, FindingsMixin

    class Base:
        def create_optimizer(self, model=None):
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            return self.optimizer

    class Trainer(FindingsMixin, Base):
        args = type("Args", (), {"learning_rate": 0.1})()

    trainer = Trainer()
    trainer.findings_heads = FindingsHeads(4, {f: ["a", "b"] for f in FACTS})
    optimizer = trainer.create_optimizer()
    assert len(optimizer.param_groups) == 2
    before = [p.detach().clone() for p in trainer.findings_heads.parameters()]
    for _ in range(2):
        out = trainer.findings_heads(torch.randn(3, 5, 4))
        torch.stack([o.sum() for o in out]).sum().backward()
        optimizer.step()
        assert all(p.grad is None for p in trainer.findings_heads.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, trainer.findings_heads.parameters(), strict=True)
    )


def test_findings_heads_change_the_projector_gradient(data, tmp_path):
    # same run with and without the findings loss: the projector ends elsewhere, so the heads' gradient reached it
    _write_instances(data["root"], 16)
    run_sft(data, tmp_path / "plain", stage="align", max_steps=2)
    run_sft(data, tmp_path / "aux", stage="align", max_steps=2, script={"findings_loss": 5.0})
    plain, aux = load_llava(tmp_path / "plain"), load_llava(tmp_path / "aux")
    proj = [k for k in plain.state_dict() if "multi_modal_projector" in k]
    assert proj and any(not torch.equal(plain.state_dict()[k], aux.state_dict()[k]) for k in proj)


def test_stage0_findings_words_trains_the_tail_towards_the_fact_words(data, tmp_path):
    # train.findings_words: the tower's last feeding blocks and the projector learn on cached block inputs; the
    # output is a plain Llava whose LLM is untouched
    from train.findings_words import FACT_WORDS, fact_tables, labels_of, main

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    modalities = list(FACT_WORDS["modality"])
    for split, n in (("train", 12), ("val", 4)):
        rows = []
        for i in range(n):
            random_image(i + (100 if split == "val" else 0), size=(40, 32)).save(
                root / "images" / f"{split}{i}.png"
            )
            count = i % 4
            lesion = {"side": "left", "position": "upper", "size": "small"} if count else {}
            rows.append(
                {
                    "image": f"images/{split}{i}.png",
                    "modality": modalities[i % 3],
                    "region": "head",
                    "count": count,
                }
                | lesion
            )
        write_jsonl(root / f"instances_{split}.jsonl", rows)
    report = main(
        [
            "--model",
            str(data["model4"]),
            "--image-size",
            "28",
            "--data",
            str(root),
            "--output",
            str(tmp_path / "s0"),
        ]
        + ["--epochs", "2", "--batch-size", "4"]
    )
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    assert {"val_modality", "val_count", "val_side"} <= set(report["history"][-1])
    base, after = load_llava(data["model4"]), load_llava(tmp_path / "s0")
    changed = changed_by_part(base, after)
    assert changed["projector"][0] > 0 and changed["vision"][0] > 0 and changed["llm"][0] == 0
    # only the last 2 feeding blocks of the 4-block tower (blocks 1 and 2; block 3 does not feed layer -2)
    moved_blocks = {n.split("layer.")[1].split(".")[0] for n in moved(base, after) if "vision_tower" in n}
    assert moved_blocks == {"1", "2"}
    # labels: a fact the image lacks (no lesion: no side) is -100
    from transformers import AutoTokenizer

    tables = fact_tables(AutoTokenizer.from_pretrained(data["model4"]), [{"region": "head"}])
    labels = labels_of([{"modality": "CT", "region": "head", "count": 0}], tables)
    facts = list(tables)
    assert labels[0, facts.index("side")] == -100 and labels[0, facts.index("count")] == 0


def test_word_heads_score_only_facts_with_words_and_skip_none(data):
    from transformers import AutoTokenizer

    from train.findings import FACTS, WordHeads

    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    classes = {
        "modality": ["CT", "MRI"],
        "region": ["head", "leg"],
        "present": ["no", "yes"],
        "count": ["0", "1", "2", "3"],
        "side": ["left", "none", "right"],
        "position": ["lower", "none", "upper"],
        "size": ["large", "none", "small"],
        "contrast": ["bright", "dark", "none"],
    }
    embeddings = torch.randn(len(tokenizer), 8)
    heads = WordHeads(embeddings, tokenizer, classes)
    findings = torch.tensor([[1, 0, 1, 2, 2, 1, 0, 0], [0, 1, 0, 0, 1, 1, 1, 2]])
    targets = heads.targets(findings)
    col = {fact: i for i, fact in enumerate(FACTS)}
    assert (targets[:, col["present"]] == -100).all()  # presence has no word (the count's " no" carries it)
    assert targets[0, col["contrast"]] == 0 and targets[1, col["contrast"]] == -100  # "none": not scored
    assert targets[0, col["side"]] == 2 and targets[1, col["side"]] == -100  # "none": not scored
    assert targets[0, col["count"]] == 2 and targets[1, col["modality"]] == 0
    # a token equal to the embedding of " MRI" scores MRI above CT
    mri = tokenizer(" MRI", add_special_tokens=False)["input_ids"][0]
    logits = heads(embeddings[mri].reshape(1, 1, 8).repeat(1, 3, 1))
    assert logits[col["present"]] is None and logits[col["modality"]].argmax(-1).item() == 1
