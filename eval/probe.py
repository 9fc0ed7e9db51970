"""Linear probes on a Llava's frozen image features: which medsynth facts the vision tower hands the LLM.

A VQA score says what the whole model answers; a probe says what its image features carry, so a low score can be
put on the right part (the encoder and its resolution, or the projector + LLM that read them). For each
`instances_<split>.jsonl` fact (modality, region, lesion presence, count, and side / position / size / contrast
on images with lesions) it fits a softmax regression on the train images' features and scores the test images.

Features are the vision tower's patch tokens at a hidden layer (the Llava's own `vision_feature_layer` by
default, CLS dropped as Llava's "default" strategy does), through the model's own image processor, either
mean-pooled over the patches (`mean`) or the patch grid pooled to at most 8 x 8 and flattened (`grid`, keeps
where things are). Hand-written on purpose: a full-batch softmax regression is a few lines of torch, and no
installed package offers probes of a Llava's tower.

Usage:
    python -m eval.probe --model default --data data/medsynth
    python -m eval.probe --model outputs/starter/stage1_align --layers=-2,-4,-6 --output outputs/probe.json

Prints one table row per (layer, pooling) with test accuracy per fact, and the majority-class baseline.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from medllava.generation import load
from medllava.processing import load_image
from medllava.schema import read_rows

# fact -> which images it is defined on (None: every image)
FACTS = {
    "modality": None,
    "region": None,
    "present": None,
    "count": None,
    "side": "lesion",
    "position": "lesion",
    "size": "lesion",
    "contrast": "lesion",
}
GRID = 8  # the grid features are pooled to at most GRID x GRID patches


def fact_value(instance: dict, fact: str):
    """The label of `fact` for one instance, or None where the fact is undefined (no lesion)."""
    if fact == "present":
        return instance["count"] > 0
    if FACTS[fact] == "lesion" and not instance["count"]:
        return None
    value = instance.get(fact)
    if value is None and FACTS[fact] is None:
        raise ValueError(f"instance {instance.get('id')} has no '{fact}'")
    return value


@torch.inference_mode()
def image_features(model, processor, paths: list[Path], layers: list[int], batch_size: int = 32) -> dict:
    """{layer: {"mean": (N, D), "grid": (N, g*g*D)}} of the patch tokens the Llava would project."""
    strategy = model.config.vision_feature_select_strategy
    tower = model.model.vision_tower
    out: dict[int, dict[str, list]] = {layer: {"mean": [], "grid": []} for layer in layers}
    for start in tqdm(range(0, len(paths), batch_size), desc="features", unit="batch"):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        for layer in layers:
            h = hidden[layer].float()
            if strategy == "default":
                h = h[:, 1:]
            side = int(round(h.shape[1] ** 0.5))
            if side * side != h.shape[1]:
                raise ValueError(f"{h.shape[1]} patch tokens are not a square grid")
            grid = h.transpose(1, 2).reshape(len(h), -1, side, side)
            grid = torch.nn.functional.adaptive_avg_pool2d(grid, min(side, GRID))
            out[layer]["mean"].append(h.mean(1))
            out[layer]["grid"].append(grid.flatten(1))
    return {layer: {k: torch.cat(v) for k, v in feats.items()} for layer, feats in out.items()}


def fit_probe(
    x_train, y_train, x_test, epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-2, seed=0
):
    """Softmax regression on standardised features, full-batch AdamW; returns the test predictions."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    classes = int(y_train.max()) + 1
    weight = torch.zeros(x_train.shape[1], classes)
    weight.normal_(0, 0.01, generator=generator)
    weight.requires_grad_(True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (x_test @ weight + bias).argmax(1)


def run(
    model, processor, data: Path, layers: list[int], epochs: int = 200, train="train", test="test"
) -> dict:
    splits = {}
    for split in (train, test):
        instances = read_rows(data / f"instances_{split}.jsonl")
        paths = [data / inst["image"] for inst in instances]
        splits[split] = (instances, image_features(model, processor, paths, layers))
    (tr_inst, tr_feats), (te_inst, te_feats) = splits[train], splits[test]
    labels = {}  # fact -> (train rows, train labels, test rows, test labels): the same for every layer
    for fact in FACTS:
        tr = [(i, v) for i, inst in enumerate(tr_inst) if (v := fact_value(inst, fact)) is not None]
        classes = sorted({v for _, v in tr}, key=str)
        # a test value never seen in train can't be probed
        te = [(i, v) for i, inst in enumerate(te_inst) if (v := fact_value(inst, fact)) in classes]
        if len(classes) < 2 or not te:
            continue
        index = {v: k for k, v in enumerate(classes)}
        labels[fact] = (
            [i for i, _ in tr],
            torch.tensor([index[v] for _, v in tr]),
            [i for i, _ in te],
            torch.tensor([index[v] for _, v in te]),
        )
    results = []
    for layer in layers:
        for pooling in ("mean", "grid"):
            row = {"layer": layer, "pooling": pooling, "facts": {}}
            for fact, (i_tr, y_tr, i_te, y_te) in labels.items():
                x_tr, x_te = tr_feats[layer][pooling][i_tr], te_feats[layer][pooling][i_te]
                predicted = fit_probe(x_tr, y_tr, x_te, epochs=epochs)
                majority = Counter(y_tr.tolist()).most_common(1)[0][0]
                row["facts"][fact] = {
                    "accuracy": float((predicted == y_te).float().mean()),
                    "majority": float((y_te == majority).float().mean()),
                    "n_train": len(i_tr),
                    "n_test": len(i_te),
                }
            results.append(row)
    return {"data": str(data), "train": train, "test": test, "epochs": epochs, "probes": results}


def table(result: dict) -> str:
    facts = list(FACTS)
    lines = [
        "| layer | pooling | " + " | ".join(facts) + " |",
        "|---|---|" + "---|" * len(facts),
    ]
    first = result["probes"][0]["facts"] if result["probes"] else {}
    lines.append(
        "| majority | - | "
        + " | ".join(f"{first[f]['majority']:.2f}" if f in first else "-" for f in facts)
        + " |"
    )
    for row in result["probes"]:
        cells = [f"{row['facts'][f]['accuracy']:.2f}" if f in row["facts"] else "-" for f in facts]
        lines.append(f"| {row['layer']} | {row['pooling']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a Llava directory")
    parser.add_argument(
        "--data", type=Path, default=Path("data/medsynth"), help="folder with instances_<split>.jsonl"
    )
    parser.add_argument(
        "--layers", default=None, help="hidden layers, e.g. --layers=-2,-4 (default: the Llava's)"
    )
    parser.add_argument("--epochs", type=int, default=200, help="full-batch optimisation steps per probe")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.model == "default":
        from medllava.assets import default_model_dir

        args.model = str(default_model_dir())
    model, processor = load(args.model)
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: give --layers")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [layer]
    result = {"model": args.model} | run(model, processor, args.data, layers, args.epochs)
    print(table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
