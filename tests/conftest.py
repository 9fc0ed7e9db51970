"""Shared fixtures: tiny random Llava models built in code around the real SmolLM2 tokenizer.

The tokenizer comes from the packaged SmolLM2 conversion (`make setup` builds it; the fixture builds it if
missing). Models are random and tiny (a few hundred thousand parameters), so the fast suite runs on CPU.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The stage folders (train, eval, serve, bench) run from the checkout, not from site-packages (README "Layout"):
# subprocesses the tests start (python -m eval.generate, accelerate launch train/sft.py) find them through this.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(
    image_size: int = 28,
    seed: int = 0,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    vision_layers: int = 2,
):
    """A random (model, processor) pair: DINOv2-like tower, Llama LLM, real tokenizer and chat template."""
    from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from medllava.assets import llm_dir
    from medllava.modeling import build_model

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir())
    vision = Dinov2Model(
        Dinov2Config(
            hidden_size=vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=14,
            image_size=image_size,
            layerscale_value=1.0,
        )
    )
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return build_model(vision=vision, llm=llm, tokenizer=tokenizer, image_size=image_size, seed=seed)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) shared by read-only tests; do not train it (use `tiny_model()` for a private copy)."""
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny MedLLaVA checkpoint directory (plain HF Llava)."""
    model, processor = tiny_model()
    path = tmp_path_factory.mktemp("tiny-medllava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def random_image(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def image():
    return random_image()
