"""eval.diagnostics.probe: softmax-regression probes on a Llava's frozen patch features, scored on held-out images."""

import json

import numpy as np
import torch
from PIL import Image

from eval.diagnostics.probe import FACTS, fact_value, fit_mlp_probe, fit_probe, main


def test_fit_probe_learns_a_separable_rule_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=generator)
    y = (x[:, 3] - x[:, 7] > 0).long()  # a linear rule
    predicted = fit_probe(x[:300], y[:300], x[300:], epochs=300, lr=1e-2)
    assert (predicted == y[300:]).float().mean() >= 0.9
    noise = torch.randint(0, 2, (400,), generator=generator)  # labels unrelated to x
    predicted = fit_probe(x[:300], noise[:300], x[300:], epochs=300, lr=1e-2)
    assert 0.3 <= (predicted == noise[300:]).float().mean() <= 0.7


def _instance(i, split, bright: bool, lesion_left: bool | None):
    count = 0 if lesion_left is None else 1
    return {
        "id": f"{split}-{i}",
        "image": f"images/{split}-{i}.png",
        "modality": "CT" if bright else "MRI",
        "region": "head",
        "count": count,
        "side": None if not count else ("left" if lesion_left else "right"),
        "position": None if not count else "upper",
        "size": None if not count else ("small" if i % 2 else "large"),
        "contrast": None if not count else "bright",
    }


def test_probe_reads_image_facts_from_the_tower(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for split, n in (("train", 40), ("test", 16)):
        rows = []
        for i in range(n):
            bright, lesion = bool(i % 2), [None, True, False][i % 3]
            pixels = rng.normal(200 if bright else 40, 10, (56, 56)).clip(0, 255)
            rows.append(_instance(i, split, bright, lesion))
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / rows[-1]["image"])
        (tmp_path / f"instances_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe.json"
    (tmp_path / "instances_val.jsonl").write_text((tmp_path / "instances_test.jsonl").read_text())
    main(
        ["--model", str(tiny_model_dir), "--data", str(tmp_path), "--epochs", "100", "--probe", "both"]
        + ["--mlp-epochs", "10", "--output", str(out)]
    )
    result = json.loads(out.read_text())
    assert [(p["layer"], p["probe"], p["pooling"]) for p in result["probes"]] == [
        (-2, "linear", "mean"),
        (-2, "linear", "grid"),
        (-2, "mlp", "tokens"),
    ]
    assert result["probes"][2]["facts"]["modality"]["accuracy"] == 1.0
    facts = result["probes"][0]["facts"]
    # one-valued facts (region, position, contrast) cannot be probed and are left out, not scored
    assert set(facts) == {"modality", "present", "count", "side", "size"}
    assert facts["modality"]["accuracy"] == 1.0  # dark vs bright images: any tower separates them
    assert facts["side"]["n_test"] == sum(i % 3 != 0 for i in range(16))  # only images with a lesion
    assert facts["modality"]["majority"] == 0.5


def test_fact_values():
    inst = _instance(0, "train", True, None)
    assert fact_value(inst, "present") is False and fact_value(inst, "side") is None
    assert fact_value(_instance(1, "train", False, True), "side") == "left"
    assert set(FACTS) >= {"modality", "count", "side"}


def test_mlp_probe_reads_where_a_token_is_and_not_noise():
    # one "lesion" token among 16: the class is whether it sits in the first or the second half of the grid,
    # which no pooled linear feature shows
    generator = torch.Generator().manual_seed(0)
    n, tokens, dim = 500, 16, 8
    x = torch.randn(n, tokens, dim, generator=generator) * 0.1
    where = torch.randint(0, tokens, (n,), generator=generator)
    x[torch.arange(n), where, 0] += 3.0
    y = (where >= tokens // 2).long()
    predicted, epoch = fit_mlp_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], epochs=40, lr=3e-3)
    assert (predicted == y[400:]).float().mean() >= 0.9 and 1 <= epoch <= 40
    noise = torch.randint(0, 2, (n,), generator=generator)
    predicted, _ = fit_mlp_probe(x[:300], noise[:300], x[300:400], noise[300:400], x[400:], epochs=20)
    assert 0.3 <= (predicted == noise[400:]).float().mean() <= 0.7


def test_image_size_changes_the_grid_the_tower_sees(tiny_model_dir, tmp_path):
    import pytest

    from eval.diagnostics.probe import image_features, set_image_size
    from medllava.generation import load

    model, processor = load(str(tiny_model_dir))
    path = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(path)
    side = processor.image_processor.size["height"] // 14
    assert image_features(model, processor, [path], [-2], tokens=True)[-2]["tokens"].shape[1] == side * side
    set_image_size(processor, 14 * (side + 1))  # DINOv2 interpolates its position embeddings: no retraining
    assert (
        image_features(model, processor, [path], [-2], tokens=True)[-2]["tokens"].shape[1] == (side + 1) ** 2
    )
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        set_image_size(processor, 30)
