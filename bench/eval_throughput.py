"""VQA answering speed: batched greedy generation against one question at a time (LLaVA-Med's model_vqa way).

Usage:
    .venv/bin/python -m bench.eval_throughput [--questions 32] [--batch-sizes 4 8 16 32] [--max-new-tokens 12]
        [--model base] [--data data/medsynth/vqa_test.jsonl] [--dtype float32]

Answers the same questions (the first N of --data if it exists, else synthetic random-image questions) with the
default base model on CPU, once one by one and once per batch size (in eval.generate's order: grouped by answer
type and length), and prints questions/s, the speedup over one
at a time, whether the answers are identical, and the work done as a fraction of the GEMM limit measured in the
same run (FLOPs counted as 2 x weights x tokens of the matrix products that run, attention ignored). The 1-minute load average is
printed before, after and at the end of each row: rows measured on a busy machine understate what it can do, and
a load that changes during the run makes the speedups unreliable.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import gemm_gflops, machine_state, markdown_table
from medllava.generation import batch_key, generate, load
from medllava.processing import load_image
from medllava.prompts import ANSWER_SUFFIXES, with_suffix
from medllava.schema import (
    infer_answer_type,
    message,
    prompt_messages,
    read_valid_rows,
    vqa_answer,
    vqa_question,
)

SYNTHETIC = [
    ("Is there a mass in this image? Answer yes or no.", "CLOSED"),
    ("Which organ is shown? Answer with a short phrase.", "OPEN"),
    ("Is this image normal? Answer yes or no.", "CLOSED"),
    ("What imaging modality was used? Answer with a short phrase.", "OPEN"),
]


def synthetic_examples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
        question, answer_type = SYNTHETIC[i % len(SYNTHETIC)]
        out.append({"images": [image], "messages": [message("user", question, 1)], "answer_type": answer_type,
                    "question": question})  # fmt: skip
    return out


def data_examples(path: Path, n: int) -> list[dict]:
    examples = []
    for _, row in read_valid_rows(path, limit=n):
        answer_type = row.get("answer_type") or infer_answer_type(vqa_answer(row))
        examples.append(
            {
                "images": [load_image(p) for p in row["images"]],
                "messages": with_suffix(prompt_messages(row), ANSWER_SUFFIXES.get(answer_type, "")),
                "answer_type": answer_type,
                "question": vqa_question(row),
            }
        )
    return examples


def eval_order(examples: list[dict]) -> list[int]:
    """The order eval.generate answers in (grouped by answer type and length)."""
    keys = [batch_key(e["answer_type"], len(e["images"]), e["question"]) for e in examples]
    return sorted(range(len(examples)), key=lambda i: (keys[i], i))


def answer_all(model, processor, examples: list[dict], batch_size: int, max_new_tokens: int):
    """(seconds, completions) for answering every example in batches of `batch_size`."""
    completions = []
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        completions += generate(model, processor, examples[i : i + batch_size], images_loaded=True,
                                max_new_tokens=max_new_tokens)  # fmt: skip
    return time.perf_counter() - start, completions


def linear_params(module) -> int:
    """Weights that run as matrix products (Linear and Conv2d): embedding lookups, position tables and norms do
    no GEMM work."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds))


def flops(model, processor, completions) -> float:
    """2 x weights x tokens of the matrix products generation runs, attention scores ignored: the LLM's layers
    over every prompt and generated token, its LM head once per generated token (generate scores only the last
    position), and the vision tower over each image's patches at the processor's resolution (not the config's
    image_size: the tower interpolates to the processor's grid)."""
    layers = linear_params(model.model.language_model)
    head = model.lm_head.weight.numel()
    vision = linear_params(model.model.vision_tower)
    size, patch = processor.image_processor.size, processor.patch_size
    patches = (size["height"] // patch) * (size["width"] // patch) + processor.num_additional_image_tokens
    tokens = sum(c.prompt_tokens + c.completion_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return 2.0 * (layers * tokens + head * generated + vision * patches * len(completions))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.eval_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="'base' (the default base model) or a Llava directory")
    p.add_argument(
        "--data", default="data/medsynth/vqa_test.jsonl", help="questions to use if the file exists"
    )
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    before = machine_state()
    gflops_limit = gemm_gflops(getattr(torch, args.dtype))
    if args.model == "base":
        from medllava.assets import base_dir

        model_dir = base_dir()
    else:
        model_dir = Path(args.model)
    model, processor = load(str(model_dir), dtype=args.dtype)
    data = Path(args.data)
    examples = data_examples(data, args.questions) if data.is_file() else synthetic_examples(args.questions)
    source = (
        f"first {len(examples)} questions of {data}"
        if data.is_file()
        else f"{len(examples)} synthetic questions"
    )
    generate(model, processor, examples[:2], images_loaded=True, max_new_tokens=2)  # warm-up

    base_s, base = answer_all(model, processor, examples, 1, args.max_new_tokens)
    rows = [["one at a time (model_vqa)", 1, f"{base_s:.1f}", f"{len(examples) / base_s:.2f}", "1.00x", "-",
             f"{sum(c.completion_tokens for c in base) / base_s:.1f}", f"{os.getloadavg()[0]:.1f}"]]  # fmt: skip
    fractions = [flops(model, processor, base) / base_s]
    order = eval_order(examples)
    for batch_size in args.batch_sizes:
        seconds, out = answer_all(
            model, processor, [examples[i] for i in order], batch_size, args.max_new_tokens
        )
        same = all(c.text == base[i].text for i, c in zip(order, out, strict=True))
        rows.append([f"batched {batch_size}", batch_size, f"{seconds:.1f}", f"{len(examples) / seconds:.2f}",
                     f"{base_s / seconds:.2f}x", "yes" if same else "NO",
                     f"{sum(c.completion_tokens for c in out) / seconds:.1f}", f"{os.getloadavg()[0]:.1f}"])  # fmt: skip
        fractions.append(flops(model, processor, out) / seconds)
    after = machine_state()
    gflops_after = gemm_gflops(getattr(torch, args.dtype))
    limit = max(gflops_limit, gflops_after)
    for row, run_flops in zip(rows, fractions, strict=True):
        row.append(f"{run_flops / 1e9 / limit:.1%}")

    print(f"model {model_dir} ({args.dtype}), {source}, greedy, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"GEMM limit measured now: {gflops_limit:.0f} GFLOP/s before, {gflops_after:.0f} after ({args.dtype}; "
          f"the larger is the limit below; ~200 fp32 on a quiet machine)")  # fmt: skip
    print(f"machine before: {before}; after: {after}\n")
    print(markdown_table(["mode", "batch", "wall s", "questions/s", "speedup", "same answers", "gen tok/s",
                          "load after", "of GEMM limit"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
