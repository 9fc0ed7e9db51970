"""eval.diagnostics.likelihood: mean NLL over exactly the assistant tokens the training collator labels."""

import json
import math

import torch
from conftest import random_image

from eval.diagnostics.likelihood import assistant_nll, main
from medllava.generation import load
from medllava.processing import AssistantOnlyCollator


def _rows(tmp_path):
    rows = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        random_image(i).save(path)
        rows.append(
            {
                "id": f"r{i}",
                "images": [f"img{i}.png"],
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": f"A scan with {i} lesions."}]},
                ],
            }
        )
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def test_likelihood_equals_the_models_own_loss(tiny_model_dir, tmp_path):
    data, rows = _rows(tmp_path)
    model, processor = load(str(tiny_model_dir))
    for row in rows:
        row["images"] = [str(tmp_path / p) for p in row["images"]]
    result = assistant_nll(model, processor, rows, batch_size=2)
    batch = AssistantOnlyCollator(processor)(rows)
    with torch.no_grad():
        expected = float(model(**batch).loss)  # HF's loss: mean over the labelled (assistant) tokens
    assert math.isclose(result["nll"], expected, rel_tol=1e-4)
    assert result["assistant_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert math.isclose(result["perplexity"], math.exp(result["nll"]))
    main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "nll.json")])
    assert math.isclose(json.loads((tmp_path / "nll.json").read_text())["nll"], expected, rel_tol=1e-4)
