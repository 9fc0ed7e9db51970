"""Training throughput of the default base on CPU: tokens/s (non-pad) and peak memory per step kind.

Stage 1 style: projector trainable, everything else frozen. Stage 2/3 style: projector + LLM trainable (full).
Each configuration runs in its own process (so peak RSS is its own) with the training collator
(medllava.processing.AssistantOnlyCollator), AdamW and the recipes' precision, on synthetic conversations with
one image at the base's resolution. Reports the median step of `--steps` after one warm-up step, and whether the
machine was quiet (CPU time used by other processes during the run, from /proc/stat).

`--malloc both` runs every configuration twice: with glibc's default malloc and with mk/malloc.mk's settings
that keep freed memory (MALLOC_* below), and reports the share of CPU time spent in the kernel for each.

Usage:
    python -m bench.train_throughput                       # bf16 autocast, batch 8, 5 steps per configuration
    python -m bench.train_throughput --malloc both         # default glibc malloc against the Makefile's settings
    python -m bench.train_throughput --dtype fp32 --batch-size 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medllava.reports import markdown_table

CONFIGS = {"stage1": "align", "stage2/3": "instruct"}
# Training bound by compute for the 135M LLM (6 x params FLOP per token) at the 2-thread GEMM peak measured on
# this machine kind (~200 GFLOP/s fp32, ~425 bf16)
COMPUTE_BOUND_TOK_S = {"bf16": 527.0, "fp32": 248.0}


# What `make` exports (glibc: keep freed memory instead of returning it to the kernel after each step), read
# from the one file that sets it.
MALLOC_MK = Path(__file__).resolve().parents[1] / "mk" / "malloc.mk"
KEEP_MALLOC = dict(re.findall(r"^export (MALLOC_\w+) \?= (\S+)$", MALLOC_MK.read_text(), re.MULTILINE))


def malloc_env(mode: str) -> dict:
    """The environment for a child process: glibc malloc's defaults ("default") or KEEP_MALLOC ("keep")."""
    env = {k: v for k, v in os.environ.items() if k not in KEEP_MALLOC}
    return {**env, **KEEP_MALLOC} if mode == "keep" else env


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def synthetic_rows(n: int, image_size: int, words: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        question = " ".join(
            ["Is", "there", "a", "lesion", "in", "the", "left", "upper", "part"][: max(3, words // 4)]
        )
        answer = " ".join(["a", "small", "bright", "round", "lesion", "is", "seen"] * (1 + words // 7))[
            : words * 6
        ]
        rows.append(
            {
                "images": [image],
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": f"{question}? ({i})"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
            }
        )
    return rows


def measure(stage: str, args) -> dict:
    """Run in a child process: median step time, tokens/s and peak RSS for one stage."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medllava.assets import base_dir
    from medllava.modeling import freeze_for_stage
    from medllava.processing import AssistantOnlyCollator

    torch.manual_seed(0)
    path = base_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    freeze_for_stage(model, stage)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    image_size = processor.image_processor.size["height"]
    rows = synthetic_rows(args.batch_size, image_size, args.words)

    batch = AssistantOnlyCollator(processor)(rows)  # load_image passes PIL images through; collated once
    tokens = int(batch["attention_mask"].sum())
    times = []
    busy0, own0, wall0 = busy_jiffies(), own_cpu_seconds(), time.perf_counter()
    sys0 = os.times().system
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    wall = time.perf_counter() - wall0
    kernel_share = (os.times().system - sys0) / max(own_cpu_seconds() - own0, 1e-9)
    others = ((busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_cpu_seconds() - own0)) / wall
    step = statistics.median(times[1:])
    return {
        "stage": stage,
        "batch": args.batch_size,
        "tokens_per_step": tokens,
        "image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
        "step_s": step,
        "tokens_per_s": tokens / step,
        "samples_per_s": args.batch_size / step,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "other_cores_busy": max(0.0, others),
        "threads": torch.get_num_threads(),
        "kernel_share": kernel_share,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast (recipes) or fp32"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)"
    )
    parser.add_argument("--words", type=int, default=24, help="approximate words per answer")
    parser.add_argument(
        "--malloc",
        choices=["keep", "default", "both"],
        default="keep",
        help="glibc malloc settings of the child processes: mk/malloc.mk's (keep), glibc's defaults, or both",
    )
    parser.add_argument("--stage", choices=sorted(CONFIGS.values()), help=argparse.SUPPRESS)  # child process
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        print(json.dumps(measure(args.stage, args)))
        return 0
    results = []
    modes = ["default", "keep"] if args.malloc == "both" else [args.malloc]
    for (name, stage), mode in ((c, m) for c in CONFIGS.items() for m in modes):
        cmd = [
            sys.executable,
            "-m",
            "bench.train_throughput",
            "--stage",
            stage,
            "--dtype",
            args.dtype,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--words",
            str(args.words),
        ]
        print(f"measuring {name} (malloc {mode}) ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=malloc_env(mode))
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results.append((name, {**json.loads(out.stdout.strip().splitlines()[-1]), "malloc": mode}))
    bound = COMPUTE_BOUND_TOK_S[args.dtype]
    print(
        f"command: python -m bench.train_throughput {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    )
    print(
        f"default base at {results[0][1]['image_tokens'] // args.batch_size} image tokens per image, {args.dtype}, "
        f"batch {args.batch_size}, median of {args.steps} steps, {results[0][1]['threads']} threads"
    )
    headers = [
        "step kind",
        "malloc",
        "trainable (M)",
        "tokens/step (non-pad)",
        "s/step",
        "tokens/s",
        "samples/s",
        "% of LLM compute bound",
        "kernel share of CPU time",
        "peak RSS (GiB)",
        "other processes (cores busy)",
    ]
    rows = [
        [
            name,
            r["malloc"],
            f"{r['trainable_m']:.1f}",
            r["tokens_per_step"],
            f"{r['step_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['samples_per_s']:.2f}",
            f"{100 * r['tokens_per_s'] / bound:.0f}%",
            f"{100 * r['kernel_share']:.0f}%",
            f"{r['peak_rss_gib']:.2f}",
            f"{r['other_cores_busy']:.2f}",
        ]
        for name, r in results
    ]
    print(markdown_table(headers, rows))
    busy = max(r["other_cores_busy"] for _, r in results)
    print(
        f"machine {'quiet' if busy < 0.1 else 'NOT quiet'}: other processes kept {busy:.2f} of "
        f"{os.cpu_count()} cores busy during the runs" + ("" if busy < 0.1 else " (figures are pessimistic)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
