"""Held-out likelihood of the assistant turns of a schema file: what stages 1 and 2 are trained to improve.

Usage:
    python -m eval.diagnostics.likelihood --model outputs/starter/stage1_align --data data/medsynth/captions_val.jsonl
    python -m eval.diagnostics.likelihood --model default --data data/medsynth/instruct_val.jsonl --output nll.json

Prints (and with --output writes) the mean negative log-likelihood per assistant token and its perplexity,
computed with the training collator, so exactly the tokens a stage learns are scored.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from medllava.assets import resolve_model
from medllava.generation import load
from medllava.processing import AssistantOnlyCollator
from medllava.schema import read_jsonl, resolve_image


@torch.inference_mode()
def assistant_nll(model, processor, rows: list[dict], batch_size: int = 8) -> dict:
    collator = AssistantOnlyCollator(processor)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="likelihood", unit="batch"):
        batch = collator(rows[start : start + batch_size])
        labels = batch.pop("labels")
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    nll = total / max(count, 1)
    return {"rows": len(rows), "assistant_tokens": count, "nll": nll, "perplexity": math.exp(nll)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="'default' or a Llava directory")
    parser.add_argument("--data", required=True, type=Path, help="schema JSONL file (conversations)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    args.model = resolve_model(args.model)
    model, processor = load(args.model)
    rows = []
    for _, row in read_jsonl(args.data):
        row["images"] = [str(resolve_image(image, args.data.parent)) for image in row.get("images") or []]
        rows.append(row)
        if args.limit and len(rows) >= args.limit:
            break
    result = {"model": args.model, "data": str(args.data)} | assistant_nll(
        model, processor, rows, args.batch_size
    )
    print(json.dumps(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
