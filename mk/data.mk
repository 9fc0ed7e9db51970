# Data targets (data_pipelines/). Variables are target-specific so they do not clash with other parts' mk files:
#   make data                                  # data/medsynth, seed 0, default size (~1,940 images)
#   make data DATA_OUT=/tmp/ms SEED=1 DATA_ARGS='--size 0.1'
.PHONY: data

MEDSYNTH_FILES = $(foreach stage,captions instruct vqa grpo,$(foreach split,train val test,$(DATA_OUT)/$(stage)_$(split).jsonl))

data: DATA_OUT ?= data/medsynth
data: SEED ?= 0
data: DATA_ARGS ?=
data: ## build the medsynth starter set (real images + synthetic findings) into data/medsynth and validate it
	$(PY) -m data_pipelines.medsynth --out $(DATA_OUT) --seed $(SEED) --overwrite $(DATA_ARGS)
	$(PY) -m data_pipelines.validate $(MEDSYNTH_FILES)
