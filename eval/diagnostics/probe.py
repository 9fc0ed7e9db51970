"""Probes on a Llava's frozen image features: which medsynth facts the vision tower hands the LLM.

A VQA score says what the whole model answers; a probe says what its image features carry, so a low score can be
put on the right part (the encoder and its resolution, or the projector + LLM that read them). For each
`instances_<split>.jsonl` fact (modality, region, lesion presence, count, and side / position / size / contrast
on images with lesions) it fits a softmax regression on the train images' features and scores the test images.

Features are the vision tower's patch tokens at a hidden layer (the Llava's own `vision_feature_layer` by
default, CLS dropped as Llava's "default" strategy does), through the model's own image processor, either
mean-pooled over the patches (`mean`) or the patch grid pooled to at most 8 x 8 and flattened (`grid`, keeps
where things are). Hand-written on purpose: a full-batch softmax regression is a few lines of torch, and no
installed package offers probes of a Llava's tower.

A linear probe is a floor on what the features hold. `--probe mlp` adds a nonlinear one closer to what the
projector + LLM can do: a small MLP on every patch token (all of them, unpooled, plus a learnt position
embedding), mean- and max-pooled over the patches, then a softmax layer; its epoch is chosen on the val images
(`instances_val.jsonl`), so the test images stay unseen.

Usage:
    python -m eval.diagnostics.probe --model default --data data/medsynth
    python -m eval.diagnostics.probe --model outputs/starter/stage1_align --layers=-2,-4,-6 --output outputs/probe.json
    python -m eval.diagnostics.probe --model default --probe mlp           # nonlinear readout of every patch token

Prints one table row per (layer, pooling) with test accuracy per fact, and the majority-class baseline.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from medllava.assets import resolve_model
from medllava.generation import load
from medllava.processing import load_image
from medllava.reports import markdown_table
from medllava.schema import read_rows
from medllava.token_budget import pool_tokens

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
def image_features(
    model, processor, paths: list[Path], layers: list[int], batch_size: int = 32, tokens: bool = False
) -> dict:
    """{layer: {"mean": (N, D), "grid": (N, g*g*D)[, "tokens": (N, T, D)]}} of the patch tokens the Llava would
    project (tokens, only if asked: all of them, unpooled, for the MLP probe)."""
    strategy = model.config.vision_feature_select_strategy
    tower = model.model.vision_tower
    out: dict[int, dict[str, list]] = {layer: {"mean": [], "grid": [], "tokens": []} for layer in layers}
    for start in tqdm(range(0, len(paths), batch_size), desc="features", unit="batch"):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        for layer in layers:
            h = hidden[layer].float()
            if strategy == "default":
                h = h[:, 1:]
            # (N, g*g, D) -> (N, D, g*g) flattened: each channel's pooled grid in turn
            grid = pool_tokens(h, min(math.isqrt(h.shape[1]), GRID)).transpose(1, 2)
            out[layer]["mean"].append(h.mean(1))
            out[layer]["grid"].append(grid.flatten(1))
            if tokens:
                out[layer]["tokens"].append(h.half())  # half: 1,500 images x 64 x 384 stay ~70 MB
    return {layer: {k: torch.cat(v) for k, v in feats.items() if v} for layer, feats in out.items()}


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


class TokenMLP(torch.nn.Module):
    """Per-patch MLP (+ a learnt position embedding), mean- and max-pooled over the patches, then softmax."""

    def __init__(self, n_tokens: int, dim: int, classes: int, hidden: int = 128):
        super().__init__()
        self.inp = torch.nn.Linear(dim, hidden)
        self.position = torch.nn.Parameter(torch.zeros(n_tokens, hidden))
        self.mlp = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU())
        self.out = torch.nn.Linear(2 * hidden, classes)

    def forward(self, tokens):  # (N, T, D) -> (N, classes)
        h = self.mlp(self.inp(tokens) + self.position)
        return self.out(torch.cat([h.mean(1), h.amax(1)], dim=-1))


def fit_mlp_probe(
    x_train,
    y_train,
    x_val,
    y_val,
    x_test,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
):
    """TokenMLP on standardised patch tokens (N, T, D), minibatch AdamW; the epoch with the best val accuracy
    (checked every 5) predicts the test tokens. Returns (test predictions, that epoch)."""
    mean = x_train.float().mean((0, 1))
    std = x_train.float().std((0, 1)) + 1e-5

    def norm(x):
        return (x.float() - mean) / std

    x_train, x_val, x_test = norm(x_train), norm(x_val), norm(x_test)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = TokenMLP(x_train.shape[1], x_train.shape[2], int(y_train.max()) + 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    best = (-1.0, 0, {k: v.clone() for k, v in probe.state_dict().items()})
    for epoch in range(1, epochs + 1):
        probe.train()
        with torch.enable_grad():
            for batch in torch.randperm(len(x_train), generator=generator).split(batch_size):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(probe(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
        if epoch % 5 == 0 or epoch == epochs:
            probe.eval()
            with torch.no_grad():
                accuracy = float((probe(x_val).argmax(1) == y_val).float().mean())
            if accuracy > best[0]:
                best = (accuracy, epoch, {k: v.clone() for k, v in probe.state_dict().items()})
    probe.load_state_dict(best[2])
    probe.eval()
    with torch.no_grad():
        return probe(x_test).argmax(1), best[1]


def fact_labels(fact: str, splits: dict[str, list[dict]], train: str):
    """{split: (rows, label tensor)} of one fact, or None if it cannot be probed (fewer than two classes, or
    no evaluated row). A value never seen in train is left out of the other splits: it can't be predicted."""
    tr = [(i, v) for i, inst in enumerate(splits[train]) if (v := fact_value(inst, fact)) is not None]
    classes = sorted({v for _, v in tr}, key=str)
    index = {v: k for k, v in enumerate(classes)}
    out = {}
    for split, instances in splits.items():
        rows = (
            tr
            if split == train
            else [(i, v) for i, inst in enumerate(instances) if (v := fact_value(inst, fact)) in index]
        )
        out[split] = ([i for i, _ in rows], torch.tensor([index[v] for _, v in rows], dtype=torch.long))
    if len(classes) < 2 or any(not rows for rows, _ in out.values()):
        return None
    return out


def run(
    model,
    processor,
    data: Path,
    layers: list[int],
    epochs: int = 200,
    train="train",
    test="test",
    probes: tuple[str, ...] = ("linear",),
    val="val",
    mlp_epochs: int = 60,
) -> dict:
    names = (train, test, val) if "mlp" in probes else (train, test)
    instances, feats = {}, {}
    for split in names:
        instances[split] = read_rows(data / f"instances_{split}.jsonl")
        paths = [data / inst["image"] for inst in instances[split]]
        feats[split] = image_features(model, processor, paths, layers, tokens="mlp" in probes)
    # fact -> {split: (rows, labels)}: the same for every layer
    labels = {fact: lab for fact in FACTS if (lab := fact_labels(fact, instances, train)) is not None}
    kinds = [(p, pooling) for p in probes for pooling in (("mean", "grid") if p == "linear" else ("tokens",))]
    results = []
    for layer in layers:
        for probe, pooling in kinds:
            row = {"layer": layer, "probe": probe, "pooling": pooling, "facts": {}}
            for fact, lab in tqdm(
                labels.items(), desc=f"{probe} probes, layer {layer}", disable=probe != "mlp"
            ):
                (i_tr, y_tr), (i_te, y_te) = lab[train], lab[test]
                x_tr, x_te = feats[train][layer][pooling][i_tr], feats[test][layer][pooling][i_te]
                extra = {}
                if probe == "linear":
                    predicted = fit_probe(x_tr, y_tr, x_te, epochs=epochs)
                else:
                    i_va, y_va = lab[val]
                    predicted, extra["epoch"] = fit_mlp_probe(
                        x_tr, y_tr, feats[val][layer][pooling][i_va], y_va, x_te, epochs=mlp_epochs
                    )
                majority = Counter(y_tr.tolist()).most_common(1)[0][0]
                row["facts"][fact] = {
                    "accuracy": float((predicted == y_te).float().mean()),
                    "majority": float((y_te == majority).float().mean()),
                    "n_train": len(i_tr),
                    "n_test": len(i_te),
                } | extra
            results.append(row)
    return {
        "data": str(data),
        "train": train,
        "test": test,
        "val": val if "mlp" in probes else None,
        "epochs": epochs,
        "mlp_epochs": mlp_epochs if "mlp" in probes else None,
        "probes": results,
    }


def set_image_size(processor, pixels: int) -> None:
    """Make the processor resize to pixels x pixels. The DINOv2 tower interpolates its position embeddings to any
    grid, so its features at another resolution need no retraining (the projector and LLM would)."""
    patch = processor.patch_size
    if pixels <= 0 or pixels % patch:
        raise ValueError(f"--image-size {pixels}: must be a positive multiple of the patch size {patch}")
    processor.image_processor.size = {"height": pixels, "width": pixels}


def table(result: dict) -> str:
    facts = list(FACTS)
    first = result["probes"][0]["facts"] if result["probes"] else {}
    rows = [["majority", "-", "-", *(f"{first[f]['majority']:.2f}" if f in first else "-" for f in facts)]]
    for row in result["probes"]:
        cells = [f"{row['facts'][f]['accuracy']:.2f}" if f in row["facts"] else "-" for f in facts]
        rows.append([row["layer"], row["probe"], row["pooling"], *cells])
    return markdown_table(["layer", "probe", "pooling", *facts], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a Llava directory")
    parser.add_argument(
        "--data", type=Path, default=Path("data/medsynth"), help="folder with instances_<split>.jsonl"
    )
    parser.add_argument(
        "--layers", default=None, help="hidden layers, e.g. --layers=-2,-4 (default: the Llava's)"
    )
    parser.add_argument(
        "--probe",
        choices=("linear", "mlp", "both"),
        default="linear",
        help="linear: softmax regression on pooled features; mlp: per-patch MLP on every token (needs val)",
    )
    parser.add_argument("--epochs", type=int, default=200, help="full-batch steps per linear probe")
    parser.add_argument(
        "--mlp-epochs", type=int, default=60, help="epochs per MLP probe (val picks the best)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this many pixels a side instead of the processor's (a multiple of the patch size): "
        "what a higher resolution would hand the LLM, before training one",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    args.model = resolve_model(args.model)
    model, processor = load(args.model)
    if args.image_size is not None:
        set_image_size(processor, args.image_size)
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: give --layers")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [layer]
    probes = ("linear", "mlp") if args.probe == "both" else (args.probe,)
    size = processor.image_processor.size
    result = {"model": args.model, "image_size": [size["height"], size["width"]]} | run(
        model, processor, args.data, layers, args.epochs, probes=probes, mlp_epochs=args.mlp_epochs
    )
    print(table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
