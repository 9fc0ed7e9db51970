"""Copy a MedLLaVA checkpoint with a CLIP or SigLIP tower into a directory `vllm serve` loads (GPU machines).

Usage:
    python -m serve.vllm_export --model DIR --out DIR-vllm
    vllm serve DIR-vllm --served-model-name medllava --max-model-len 2048 --limit-mm-per-prompt '{"image": 4}'

vLLM's Llava loader builds CLIP, SigLIP and Pixtral towers only (vllm 0.33.0,
vllm/model_executor/models/llava.py:446-483); the default DINOv2 tower is served by `python -m serve` instead,
and is refused here with that explanation. transformers 5 saves a CLIP/SigLIP tower inside Llava without the
`vision_model.` level of its weight names (`vision_tower.embeddings...`), while vLLM's towers keep it
(clip.py:742-748, siglip.py:819-826: `vision_tower.vision_model.embeddings...`) and stop at a name they do not
know (utils.py:438-448). The copy renames the tower's weights to the original Llava names, which transformers 5
loads as well; every other file is copied as is (tests/test_batching.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}  # the towers vLLM builds for Llava
_TOWER, _VLLM_TOWER = "vision_tower.", "vision_tower.vision_model."


def vllm_name(name: str) -> str:
    """A weight's name as vLLM's Llava loader expects it (tower weights one level deeper)."""
    if name.startswith(_TOWER) and not name.startswith(_VLLM_TOWER):
        return _VLLM_TOWER + name[len(_TOWER) :]
    return name


def export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the vLLM-ready copy of `model_dir` to `out_dir` (which must not exist yet) and return it."""
    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tower = config.get("vision_config", {}).get("model_type")
    if config.get("model_type") != "llava":
        raise ValueError(f"{model_dir} is not a Llava checkpoint (model_type {config.get('model_type')!r})")
    if tower not in TOWERS:
        raise ValueError(
            f"vLLM's Llava loader builds CLIP, SigLIP or Pixtral vision towers, not {tower!r}: serve this "
            "checkpoint with `python -m serve` (a DINOv2 tower, the default, is served there)"
        )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; give a new directory")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    out_dir.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, out_dir / path.name)
    for path in weights:
        tensors = load_file(path)
        save_file(
            {vllm_name(k): v for k, v in tensors.items()}, out_dir / path.name, metadata={"format": "pt"}
        )
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {vllm_name(k): v for k, v in data["weight_map"].items()}
        (out_dir / index.name).write_text(json.dumps(data, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve.vllm_export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="a MedLLaVA checkpoint directory with a CLIP/SigLIP tower"
    )
    parser.add_argument("--out", required=True, help="the new directory to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.model, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}; serve it with: vllm serve {out} --served-model-name medllava")


if __name__ == "__main__":
    main()
