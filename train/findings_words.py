"""Stage 0 of the starter (`make train-stage0`; vision side only, no LLM forward): teach the tower's last feeding
blocks and the projector to put each image's findings into its image tokens as the LLM's own word embeddings.

For every fact of a medsynth image (modality, region, lesion count, upper/lower, left/right, size, contrast) the
candidate words' first tokens (" CT", " MRI", " X", ...; " no", " one", " two", " three"; " bright", " dark") give
fixed prototypes: the LLM's input embeddings of those tokens. A fact's score for a word is the log-sum-exp over the
image's projected tokens of their cosine similarity with that word's embedding (over a temperature); cross-entropy
over the fact's words.
So some image token comes to look like the word " three" when there are three lesions: a token the frozen LLM can
copy, rather than a direction it must learn to decode with its few trainable weights.

Why by hand and not a Trainer: it is a few hundred projector/tower steps on cached activations (the frozen
blocks run once, before training), minutes on 2 CPU cores; the LLM never runs. Its output is a plain Llava
checkpoint, which stage 1 starts from (`--model_name_or_path`).

    python -m train.findings_words --model base --image-size 168 --data data/medsynth \\
        --output outputs/starter_v2/stage0_words --epochs 10
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from medllava.modeling import vision_blocks

logger = logging.getLogger("medllava.train")

# fact -> instance value -> the word a caption uses for it (its first token is the prototype)
FACT_WORDS = {
    "modality": {
        "CT": "CT",
        "MRI": "MRI",
        "X-ray": "X-ray",
        "ultrasound": "ultrasound",
        "fundus photograph": "fundus",
        "histology": "histology",
        "nuclear medicine": "nuclear",
    },
    "count": {0: "no", 1: "one", 2: "two", 3: "three"},
    "position": {"upper": "upper", "lower": "lower"},
    "side": {"left": "left", "right": "right"},
    "size": {"small": "small", "large": "large"},
    "contrast": {"bright": "bright", "dark": "dark"},
}


def first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def fact_tables(tokenizer, instances: list[dict]) -> dict[str, tuple[list, torch.Tensor]]:
    """fact -> (instance values in class order, their prototype token ids); regions from the data."""
    words = {fact: dict(table) for fact, table in FACT_WORDS.items()}
    words["region"] = {r: r for r in sorted({inst["region"] for inst in instances})}
    tables = {}
    for fact, table in words.items():
        values = list(table)
        ids = [first_token(tokenizer, table[v]) for v in values]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{fact}: two words share a first token: {dict(zip(values, ids, strict=True))}")
        tables[fact] = (values, torch.tensor(ids))
    return tables


def labels_of(instances: list[dict], tables) -> torch.Tensor:
    """(n, facts) class index per fact, -100 where the image has no such fact (no lesion: no side)."""
    rows = []
    for inst in instances:
        row = []
        for fact, (values, _) in tables.items():
            value = int(inst.get("count") or 0) if fact == "count" else inst.get(fact)
            row.append(values.index(value) if value in values else -100)
        rows.append(row)
    return torch.tensor(rows)


class FeedingTail(nn.Module):
    """The tower's trainable last feeding blocks, then the projector: cached block inputs -> image tokens."""

    def __init__(self, blocks: list[nn.Module], projector: nn.Module, drop_cls: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.projector = projector
        self.drop_cls = drop_cls

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.projector(hidden[:, 1:] if self.drop_cls else hidden)


def word_scores(tokens: torch.Tensor, protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """(images, classes): log-sum-exp over each image's tokens (images, tokens, d) of their cosine with each class's
    word embedding (classes, d), over the temperature. The one scoring of stage 0 and of WordHeads."""
    tokens = nn.functional.normalize(tokens.float(), dim=-1)
    protos = nn.functional.normalize(protos.float(), dim=-1)
    return torch.logsumexp(tokens @ protos.T / temperature, dim=1)


def fact_loss(
    tokens, labels, tables, embeddings, temperature: float
) -> tuple[torch.Tensor, dict[str, float]]:
    losses, accuracy = [], {}
    for i, (fact, (_, ids)) in enumerate(tables.items()):
        keep = labels[:, i] >= 0
        if not keep.any():
            continue
        scores = word_scores(tokens[keep], embeddings[ids], temperature)
        losses.append(nn.functional.cross_entropy(scores, labels[keep, i]))
        accuracy[fact] = (scores.argmax(-1) == labels[keep, i]).float().mean().item()
    return torch.stack(losses).mean(), accuracy


@torch.no_grad()
def block_inputs(model, processor, images: list[str], first: int, batch_size: int = 32) -> torch.Tensor:
    """The hidden states entering block `first` of the tower, for every image (frozen blocks, run once)."""
    from medllava.processing import load_image

    tower = model.model.vision_tower
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(
            [load_image(p) for p in images[start : start + batch_size]], return_tensors="pt"
        )["pixel_values"]
        out.append(tower(pixels, output_hidden_states=True).hidden_states[first])
    return torch.cat(out)


def main(argv=None) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medllava.assets import resolve_model
    from medllava.modeling import set_image_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--image-size", type=int, default=168)
    parser.add_argument("--data", default="data/medsynth", help="folder with instances_train/val.jsonl")
    parser.add_argument("--output", required=True)
    parser.add_argument("--blocks", type=int, default=2, help="last feeding tower blocks to train")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="projector")
    parser.add_argument("--vision-lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)

    path = resolve_model(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    set_image_size(model, processor, args.image_size)
    model.requires_grad_(False)
    data = Path(args.data)
    splits = {
        s: [
            json.loads(line) for line in open(data / f"instances_{s}.jsonl", encoding="utf-8") if line.strip()
        ]
        for s in ("train", "val")
    }
    tables = fact_tables(processor.tokenizer, splits["train"] + splits["val"])
    embeddings = model.get_input_embeddings().weight.detach()
    _, feeding = vision_blocks(model)
    first = len(feeding) - args.blocks
    tail = FeedingTail(
        feeding[first:],
        model.model.multi_modal_projector,
        model.config.vision_feature_select_strategy == "default",
    )
    tail.requires_grad_(True)
    start = time.perf_counter()
    cached = {
        s: block_inputs(model, processor, [str(data / i["image"]) for i in rows], first)
        for s, rows in splits.items()
    }
    labels = {s: labels_of(rows, tables) for s, rows in splits.items()}
    logger.info(
        "cached block-%d inputs of %s images in %.0f s",
        first,
        {s: len(r) for s, r in splits.items()},
        time.perf_counter() - start,
    )
    optimizer = torch.optim.AdamW(
        [
            {"params": tail.projector.parameters(), "lr": args.lr},
            {"params": tail.blocks.parameters(), "lr": args.vision_lr},
        ],
        weight_decay=0.0,
    )
    n = len(splits["train"])
    steps = args.epochs * ((n + args.batch_size - 1) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[args.lr, args.vision_lr], total_steps=steps, pct_start=0.05, anneal_strategy="cos"
    )
    history = []

    def evaluate() -> dict:
        tail.eval()
        with torch.no_grad():
            loss, acc = fact_loss(tail(cached["val"]), labels["val"], tables, embeddings, args.temperature)
        tail.train()
        return {"val_loss": round(loss.item(), 4), **{f"val_{k}": round(v, 3) for k, v in acc.items()}}

    history.append({"epoch": 0, **evaluate()})
    logger.info("%s", history[-1])
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(n)
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            loss, _ = fact_loss(
                tail(cached["train"][idx]), labels["train"][idx], tables, embeddings, args.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        history.append({"epoch": epoch, "train_loss": round(loss.item(), 4), **evaluate()})
        logger.info("%s", history[-1])
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    report = {"args": vars(args), "seconds": round(time.perf_counter() - start, 1), "history": history}
    (Path(args.output) / "findings_words.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
