"""bench: the work counts behind the benchmarks' "of GEMM limit" columns."""

from types import SimpleNamespace

from bench.eval_throughput import flops, linear_params
from medllava.generation import load


def test_eval_flops_count_the_matrix_products_that_run(tiny_model_dir):
    model, processor = load(str(tiny_model_dir))
    lm = model.model.language_model
    embeddings = lm.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in lm.named_parameters() if "norm" in n)
    assert linear_params(lm) == sum(p.numel() for p in lm.parameters()) - embeddings - norms > 0
    one = [SimpleNamespace(prompt_tokens=10, completion_tokens=3)]
    base = flops(model, processor, one)
    # the tower runs at the processor's grid, whatever image_size its config was converted with
    model.config.vision_config.image_size = 518
    assert flops(model, processor, one) == base
    # one more prompt token: the LLM layers only (the LM head scores generated tokens only)
    more_prompt = flops(model, processor, [SimpleNamespace(prompt_tokens=11, completion_tokens=3)])
    assert more_prompt - base == 2 * linear_params(lm)
    more_generated = flops(model, processor, [SimpleNamespace(prompt_tokens=10, completion_tokens=4)])
    assert more_generated - base == 2 * (linear_params(lm) + model.lm_head.weight.numel())
    # each image's patches at the processor's resolution
    side = processor.image_processor.size["height"] // processor.patch_size
    processor.image_processor.size = {
        "height": 2 * side * processor.patch_size,
        "width": 2 * side * processor.patch_size,
    }
    grown = flops(model, processor, one) - base
    assert grown == 2 * linear_params(model.model.vision_tower) * 3 * side * side
