# Evaluation targets (eval/). Variables are target-specific so they do not clash with other parts' mk files:
#   make eval MODEL=default DATA=data/medsynth/vqa_test.jsonl OUT=outputs/eval EVAL_ARGS='--limit 50'
.PHONY: eval bench-eval

eval: MODEL ?= default
eval: DATA ?= data/medsynth/vqa_test.jsonl
eval: OUT ?= outputs/eval
eval: EVAL_ARGS ?=
eval: ## answer DATA with MODEL (resumable) and score it into OUT: metrics.json, metrics.md, metrics.png
	$(PY) -m eval.generate --model $(MODEL) --data $(DATA) --output $(OUT)/predictions.jsonl $(EVAL_ARGS)
	$(PY) -m eval.score --predictions $(OUT)/predictions.jsonl --output $(OUT)

bench-eval: ## questions/s of batched vs one-at-a-time VQA answering on the default base model (CPU)
	$(PY) -m bench.eval_throughput
