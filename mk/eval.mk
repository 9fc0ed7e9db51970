# Evaluation targets (eval/). Variables are target-specific so they do not clash with other parts' mk files:
#   make eval MODEL=default DATA=data/medsynth/vqa_test.jsonl OUT=outputs/eval EVAL_ARGS='--limit 50'
#   make scoreboard MODEL="default outputs/starter/dpo" SCOREBOARD_ARGS='--limit 48 --judge http://127.0.0.1:8000/v1'
.PHONY: eval scoreboard bench-eval eval-describe

eval: MODEL ?= default
eval: DATA ?= data/medsynth/vqa_test.jsonl
eval: OUT ?= outputs/eval
eval: EVAL_ARGS ?=
eval: ## answer DATA with MODEL (resumable) and score it into OUT: metrics.json, metrics.md, metrics.png
	$(PY) -m eval.generate --model $(MODEL) --data $(DATA) --output $(OUT)/predictions.jsonl $(EVAL_ARGS)
	$(PY) -m eval.score --predictions $(OUT)/predictions.jsonl --output $(OUT)

scoreboard: MODEL ?= default
scoreboard: OUT ?= outputs/scoreboard
scoreboard: SCOREBOARD_ARGS ?=
scoreboard: ## every test set in data/ under every harness's protocol, with image controls and leakage: OUT/scoreboard.md
	$(PY) -m eval.scoreboard $(foreach m,$(MODEL),--model $(m)) --output $(OUT) $(SCOREBOARD_ARGS)

bench-eval: ## questions/s of VQA answering one at a time, batched and with shared image prefixes (base model, CPU)
	$(PY) -m bench.eval_throughput

eval-describe: MODEL ?= default
eval-describe: OUT ?= outputs/describe
eval-describe: DESCRIBE_ARGS ?=
eval-describe: ## ask MODEL to describe captions_test images: fact recall and looping replies in OUT/describe.md
	$(PY) -m eval.diagnostics.describe --model $(MODEL) --data data/medsynth/captions_test.jsonl --output $(OUT) $(DESCRIBE_ARGS)
