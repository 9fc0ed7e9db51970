"""Assemble a base Llava checkpoint (pretrained vision tower + pretrained LLM + fresh projector) for stage 1.

The CPU starter uses the packaged default base (`python -m medllava.assets base`); a cluster run first assembles
its own from hub ids or local dirs, once, on a machine that can download them:

Usage:
    python -m train.build_base --vision openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 \\
        --out outputs/cluster/base
    python -m train.build_base --vision microsoft/rad-dino --llm mistralai/Mistral-7B-Instruct-v0.2 \\
        --image-size 518 --out outputs/cluster/base-raddino
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.build_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", default="default", help="vision tower: 'default', a dir or a hub id")
    parser.add_argument("--llm", default="default", help="LLM: 'default', a dir, a .gguf file or a hub id")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side in px (towers that interpolate)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from medllava.modeling import build_model

    args = parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    model, processor = build_model(
        vision=args.vision, llm=args.llm, image_size=args.image_size, dtype=getattr(torch, args.dtype)
    )
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: {n / 1e6:.1f} M parameters, image tokens per image: {model.config.image_seq_length}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
