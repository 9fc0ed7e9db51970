# Training targets (train/). Each runs `accelerate launch` on a recipe; override with
#   RECIPE=<yaml>  OUTPUT_DIR=<dir>  ACCELERATE_CONFIG=<yaml>  NUM_PROCESSES=<n>  ARGS='<extra flags>'
#   LAUNCH_ARGS='<accelerate launch flags>' (multi-node: --machine_rank, --main_process_ip, --main_process_port)
# e.g.  make train-stage2 ARGS='--max_steps 2'
#       make train-stage2 RECIPE=train/recipes/cluster/stage2_instruct.yaml ACCELERATE_CONFIG=train/accelerate/zero3.yaml NUM_PROCESSES=8
# A re-run with the same OUTPUT_DIR resumes from its last valid checkpoint (ARGS='--resume_from_checkpoint no'
# starts over). NUM_PROCESSES, ACCELERATE_CONFIG and ARGS are defined in the main Makefile.

STARTER_RECIPES := train/recipes/starter
STARTER_OUT ?= outputs/starter
MEDSYNTH ?= data/medsynth

# Without CUDA: DeepSpeed must pick its CPU accelerator (gloo); the configs set use_cpu themselves.
ifeq ($(HAS_GPU),)
TRAIN_ENV := DS_ACCELERATOR=cpu
endif
# DeepSpeed configs need the launcher's rank variables; accelerate sets them only through its DeepSpeed or
# multi-GPU launchers, which the config files select (see docs/train.md).
# LAUNCH_ARGS: extra flags for `accelerate launch` itself (multi-node: --machine_rank 1 --main_process_ip HOST).
LAUNCH_ARGS ?=
TRAIN_LAUNCH = $(TRAIN_ENV) $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NUM_PROCESSES) \
	--num_cpu_threads_per_process $(CPU_THREADS) $(LAUNCH_ARGS)
# $(call train_run,entry point,default recipe)
train_run = $(TRAIN_LAUNCH) $(1) --config $(or $(RECIPE),$(2)) $(if $(OUTPUT_DIR),--output_dir $(OUTPUT_DIR)) $(ARGS)

.PHONY: train-stage1 train-stage2 train-stage3 train-stage3-lora train-dpo train-grpo train-starter bench-train

train-stage1: ## stage 1 (align, projector only) from the default base on medsynth captions (CPU starter)
	$(call train_run,train/sft.py,$(STARTER_RECIPES)/stage1_align.yaml)

train-stage2: ## stage 2 (instruct: projector + LLM) on medsynth conversations, from stage 1's output
	$(call train_run,train/sft.py,$(STARTER_RECIPES)/stage2_instruct.yaml)

train-stage3: ## stage 3 (specialist VQA, full) from stage 2's output; make train-stage3-lora for LoRA
	$(call train_run,train/sft.py,$(STARTER_RECIPES)/stage3_specialist.yaml)

# Stage 3's LoRA recipe trains on the VQA rows merged per image (all of an image's questions, up to 16, in one
# conversation).
$(MEDSYNTH)/vqa_train_g16.jsonl: $(MEDSYNTH)/vqa_train.jsonl
	$(PY) -m data_pipelines.group_turns --input $< --output $@ --max-turns 16 --seed 0

train-stage3-lora: ## stage 3 with LoRA on the LLM (merged model + adapter/), from stage 2's output
	@if [ -z "$(RECIPE)" ]; then $(MAKE) --no-print-directory $(MEDSYNTH)/vqa_train_g16.jsonl; fi
	$(call train_run,train/sft.py,$(STARTER_RECIPES)/stage3_specialist_lora.yaml)

$(MEDSYNTH)/dpo_train.jsonl: $(MEDSYNTH)/vqa_train.jsonl
	$(PY) -m data_pipelines.preferences dpo-swap --input $< --output $@

train-dpo: ## DPO with images on medsynth preference pairs, from stage 3's output
	@if [ -z "$(RECIPE)" ]; then $(MAKE) --no-print-directory $(MEDSYNTH)/dpo_train.jsonl; fi
	$(call train_run,train/dpo.py,$(STARTER_RECIPES)/dpo.yaml)

train-grpo: ## GRPO with format + accuracy rewards on medsynth prompts, from DPO's output
	$(call train_run,train/grpo.py,$(STARTER_RECIPES)/grpo.yaml)

# The whole CPU curriculum, each stage from the previous stage's output (recipes in train/recipes/starter/):
# stage 1 (projector) -> stage 2 (LoRA r8 + projector) -> stage 3 (LoRA r16 + projector) -> DPO (LoRA r8), every
# LoRA merged, so the result is a plain Llava whose change over the base is the projector plus low-rank factors.
# Then the delta is written to medllava/starter/ (what `make setup` rebuilds the starter from) and evaluated.
# STARTER_OUT moves every output; ARGS applies to every stage (e.g. ARGS='--max_steps 2' for a smoke run).
train-starter: ## whole starter curriculum on CPU (stage 1 -> 2 -> 3 -> DPO), its delta in medllava/starter/, eval
	@test -f $(MEDSYNTH)/captions_train.jsonl || { echo "no $(MEDSYNTH)/captions_train.jsonl: run 'make data' first"; exit 1; }
	$(MAKE) --no-print-directory $(MEDSYNTH)/dpo_train.jsonl $(MEDSYNTH)/vqa_train_g16.jsonl
	$(TRAIN_LAUNCH) train/sft.py --config $(STARTER_RECIPES)/stage1_align.yaml --output_dir $(STARTER_OUT)/stage1_align $(ARGS)
	$(TRAIN_LAUNCH) train/sft.py --config $(STARTER_RECIPES)/stage2_instruct_lora.yaml --model_name_or_path $(STARTER_OUT)/stage1_align --output_dir $(STARTER_OUT)/stage2_instruct $(ARGS)
	$(TRAIN_LAUNCH) train/sft.py --config $(STARTER_RECIPES)/stage3_specialist_lora.yaml --model_name_or_path $(STARTER_OUT)/stage2_instruct --output_dir $(STARTER_OUT)/stage3_specialist_lora $(ARGS)
	$(TRAIN_LAUNCH) train/dpo.py --config $(STARTER_RECIPES)/dpo.yaml --model_name_or_path $(STARTER_OUT)/stage3_specialist_lora --output_dir $(STARTER_OUT)/dpo $(ARGS)
	$(PY) -m medllava.assets save-starter --trained $(STARTER_OUT)/dpo
	$(MAKE) --no-print-directory eval MODEL=$(STARTER_OUT)/dpo OUT=$(STARTER_OUT)/eval
	@echo "starter curriculum done: $(STARTER_OUT)/{stage1_align,stage2_instruct,stage3_specialist_lora,dpo}; delta in medllava/starter/"

bench-train: ## training tokens/s and peak memory of the default base at 112 px (stage 1 and stage 2/3 steps)
	$(PY) -m bench.train_throughput
