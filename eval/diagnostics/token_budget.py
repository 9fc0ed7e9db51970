"""What pooling the projected patch tokens costs in what they carry, and what it saves: the measurement behind
medllava.token_budget (DEFAULT_BUDGET, MIN_SIDE).

Usage:
    .venv/bin/python -m eval.diagnostics.token_budget [--model starter] [--sides 12 8 6 4 3 2] [--slices 16]

Needs `make data` (single-image facts) and `make data-multi` (volume slices). For each grid side s it pools every
image's projected tokens (what the LLM reads) from the tower's grid to s x s, as the budget does, and fits
probes on the train images, scored on the test images:
- linear: softmax regression on the flattened pooled grid (keeps where things are);
- mlp: eval.diagnostics.probe's per-token MLP (+ position embedding, mean- and max-pooled), epoch picked on val.
Facts: on volume slices, whether the slice shows the lesion (`slice_visible`); on single medsynth images, lesion
presence, count, and upper / lower position. It also times the prefill of one question about --slices slices at
each side (the model's forward over the whole prompt) and prints the prompt's length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eval.diagnostics.probe import fit_mlp_probe, fit_probe
from medllava.assets import resolve_model
from medllava.generation import load
from medllava.processing import encode, load_image
from medllava.reports import markdown_table
from medllava.schema import message, read_rows
from medllava.token_budget import pool_tokens


@torch.inference_mode()
def projected_tokens(model, processor, paths: list[Path], batch_size: int = 32) -> torch.Tensor:
    """(N, T, D) projected patch tokens, in half precision (thousands of images stay under a GB)."""
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc="features", unit="batch"):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        out.append(torch.stack(list(feats)).half())
    return torch.cat(out)


def volume_slices(data: Path, split: str) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for inst in read_rows(data / f"instances_volume_{split}.jsonl"):
        # volumes without a lesion (lesion None) show it on no slice
        shown = inst["lesion"]["visible"] if inst.get("lesion") else [False] * len(inst["images"])
        for image, visible in zip(inst["images"], shown, strict=True):
            paths.append(data / image)
            labels.append(int(visible))
    return paths, labels


def single_images(data: Path, split: str) -> tuple[list[Path], dict[str, list]]:
    rows = read_rows(data / f"instances_{split}.jsonl")
    facts = {
        "present": [int(r["count"] > 0) for r in rows],
        "count": [min(int(r["count"]), 3) for r in rows],
        "position": [{"upper": 0, "lower": 1}.get(r.get("position")) if r["count"] else None for r in rows],
    }
    return [data / r["image"] for r in rows], facts


def probe_scores(feats: dict[str, torch.Tensor], labels: dict[str, list], side: int, mlp_epochs: int) -> dict:
    """{probe: accuracy} for one fact at one side; rows whose label is None are left out."""
    keep = {s: [i for i, y in enumerate(labels[s]) if y is not None] for s in feats}
    x = {s: pool_tokens(feats[s][keep[s]].float(), side) for s in feats}
    y = {s: torch.tensor([labels[s][i] for i in keep[s]]) for s in feats}
    linear = fit_probe(x["train"].flatten(1), y["train"], x["test"].flatten(1))
    mlp, _ = fit_mlp_probe(x["train"], y["train"], x["val"], y["val"], x["test"], epochs=mlp_epochs)
    return {
        "linear": float((linear == y["test"]).float().mean()),
        "mlp": float((mlp == y["test"]).float().mean()),
        "majority": float((y["test"] == torch.mode(y["train"]).values).float().mean()),
    }


@torch.inference_mode()
def prefill_seconds(model, processor, images: list, side: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one forward over a question about these images, each given side^2 tokens."""
    processor.image_token_budget = len(images) * side * side
    row = {
        "images": images,
        "messages": [message("user", "On how many slices is the lesion visible?", len(images))],
    }
    try:
        batch = encode(processor, [row], images_loaded=True)
    finally:
        processor.image_token_budget = None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(batch["input_ids"].shape[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="starter")
    parser.add_argument("--sides", type=int, nargs="+", default=[12, 8, 6, 4, 3, 2])
    parser.add_argument("--single", type=Path, default=Path("data/medsynth"))
    parser.add_argument("--multi", type=Path, default=Path("data/medsynth_multi"))
    parser.add_argument("--max-images", type=int, default=1500, help="per split and set (first N)")
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--slices", type=int, default=16, help="images in the timed prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    # the prefill times need a quiet machine: say how busy it was
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    model, processor = load(resolve_model(args.model))
    n = args.max_images
    feats, labels = {"volume": {}, "single": {}}, {}
    for split in ("train", "val", "test"):
        paths, vis = volume_slices(args.multi, split)
        feats["volume"][split] = projected_tokens(model, processor, paths[:n])
        labels.setdefault("slice_visible", {})[split] = vis[:n]
        paths, facts = single_images(args.single, split)
        feats["single"][split] = projected_tokens(model, processor, paths[:n])
        for fact, values in facts.items():
            labels.setdefault(fact, {})[split] = values[:n]
    slices, _ = volume_slices(args.multi, "test")
    timed = [load_image(p) for p in (slices * args.slices)[: args.slices]]
    rows = []
    for side in args.sides:
        seconds, length = prefill_seconds(model, processor, timed, side, args.repeats)
        cells = [f"{side}x{side}", side * side, length, f"{seconds:.2f}"]
        for fact in ("slice_visible", "present", "count", "position"):
            kind = "volume" if fact == "slice_visible" else "single"
            scores = probe_scores(feats[kind], labels[fact], side, args.mlp_epochs)
            cells.append(f"{scores['linear']:.2f} / {scores['mlp']:.2f} ({scores['majority']:.2f})")
        rows.append(cells)
        print(f"side {side}: {cells}", flush=True)
    headers = ["grid", "tokens/image", f"prompt tokens ({args.slices} slices)", "prefill s"]
    headers += [f"{f}: linear / mlp (majority)" for f in ("slice visible", "present", "count", "upper/lower")]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
