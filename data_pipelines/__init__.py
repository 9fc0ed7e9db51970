"""Data pipelines: one module per source, each turning an official release into the one schema
(`medllava.schema`), plus the validator, the stage-2 instruction generator and preference builders.

    python -m data_pipelines.validate FILE --image-root DIR
    python -m data_pipelines.captions --input alignment.json --image-root IMAGES --output stage1.jsonl
    python -m data_pipelines.instruct generate --input captions.jsonl --image-root IMAGES --output stage2.jsonl
    python -m data_pipelines.vqa_rad --input DIR --output DIR      # also slake, pathvqa, llava_med_eval
    python -m data_pipelines.preferences dpo-swap --input train.jsonl --output dpo.jsonl
"""
