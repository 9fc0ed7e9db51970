"""How the image resolution drives CPU cost on the default base model: the measurement behind DEFAULT_IMAGE_SIZE.

Usage:
    .venv/bin/python -m bench.image_resolution [--sizes 56 112 168 224] [--batch 4] [--steps 3]

For each side S (patch 14 -> (S/14)^2 image tokens) it times a stage-1-style training step (projector trainable,
forward + backward through the frozen LLM, AdamW) and the answer to one image question (prefill + 16 new tokens),
and prints them with the fraction of the GEMM limit measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from bench.common import gemm_gflops, machine_state
from medllava.assets import medllava_home, vision_dir
from medllava.generation import generate
from medllava.modeling import build_model, freeze_for_stage
from medllava.processing import AssistantOnlyCollator
from medllava.reports import markdown_table
from medllava.schema import message


def _example(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return {
        "images": [image],
        "messages": [
            message("user", "Describe the image briefly.", 1),
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": "An axial CT slice of the abdomen with a "
                        "small hypodense lesion in the left lobe.",
                    }
                ],
            },
        ],
    }


def measure(size: int, batch: int, steps: int) -> dict:
    model, processor = build_model(
        vision=str(vision_dir()), llm=str(medllava_home() / "smollm2-135m-instruct"), image_size=size
    )
    freeze_for_stage(model, "align")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = AssistantOnlyCollator(processor)([_example(i) for i in range(batch)])
    tokens = int(inputs["attention_mask"].sum())
    times = []
    for _ in range(steps + 1):  # first step is warm-up
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    model.eval()
    question = {
        "images": [_example(0)["images"][0]],
        "messages": [message("user", "What modality is this?", 1)],
    }
    generate(model, processor, [question], max_new_tokens=2)
    start = time.perf_counter()
    generate(model, processor, [question], max_new_tokens=16)
    answer = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "size": size,
        "image_tokens": (size // 14) ** 2,
        "step_s": step,
        "samples_s": batch / step,
        "tokens": tokens,
        # forward (2NT) + backward for activations only (2NT; weight gradients only for the small projector)
        "flops": 4 * n_params * tokens / step / 1e9,
        "answer_s": answer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 168, 224])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(machine_state())
    peak = gemm_gflops()
    print(f"fp32 GEMM measured now: {peak:.0f} GFLOP/s")
    rows = []
    for size in args.sizes:
        r = measure(size, args.batch, args.steps)
        rows.append(
            [
                f"{r['size']} px",
                r["image_tokens"],
                f"{r['step_s']:.2f}",
                f"{r['samples_s']:.2f}",
                f"{r['flops'] / peak:.0%}",
                f"{r['answer_s']:.2f}",
            ]
        )
    print(
        markdown_table(
            [
                "image side",
                "image tokens",
                f"train step s (batch {args.batch})",
                "samples/s",
                "of GEMM peak (4NT/step)",
                "answer s (16 tokens)",
            ],
            rows,
        )
    )
    print(machine_state())


if __name__ == "__main__":
    main()
