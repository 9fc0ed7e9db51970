# Training targets (train/). Each runs `accelerate launch` on a recipe; override with
#   RECIPE=<yaml>  OUTPUT_DIR=<dir>  ACCELERATE_CONFIG=<yaml>  NUM_PROCESSES=<n>  ARGS='<extra flags>'
#   LAUNCH_ARGS='<accelerate launch flags>' (multi-node: --machine_rank, --main_process_ip, --main_process_port)
# e.g.  make train-stage2 ARGS='--max_steps 2'
#       make train-stage2 RECIPE=train/recipes/cluster/stage2_instruct.yaml ACCELERATE_CONFIG=train/accelerate/zero3.yaml NUM_PROCESSES=8
# A re-run with the same output directory resumes from its last valid checkpoint (ARGS='--resume_from_checkpoint no'
# starts over). NUM_PROCESSES, ACCELERATE_CONFIG and ARGS are defined in the main Makefile.
#
# The starter chain is defined once, by the stage targets below: without RECIPE, each trains its starter recipe
# (train/recipes/starter_v2/<name>.yaml) into $(STARTER_OUT)/<name>, from $(STARTER_OUT)/<previous name>:
#   stage0_words (from 'base') -> stage1_align_tower -> stage2_instruct_lora_tower -> stage3_specialist_replay -> dpo | grpo
# DPO and GRPO both start from stage 3. The starter ships stage 3: neither preference stage improved it on the val
# split in the head-to-head (MODEL_CARD.md). `make train-starter` runs train-stage1, -stage2 and -stage3 in that
# order (after train-stage0), so running those targets one by one trains the same models. The previous starter's recipes stay in
# train/recipes/starter/ (RECIPE=...). With RECIPE, a target trains that recipe as written (its own model_name_or_path and
# output_dir; OUTPUT_DIR still overrides the latter).

STARTER_RECIPES := train/recipes/starter_v2
STARTER_OUT ?= outputs/starter_v2
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
# $(call train_out,starter recipe name): the --output_dir to pass (none: a RECIPE's own output_dir)
train_out = $(or $(OUTPUT_DIR),$(if $(RECIPE),,$(STARTER_OUT)/$(1)))
# $(call train_run,entry point,starter recipe name,previous starter recipe name or empty)
train_run = $(TRAIN_LAUNCH) $(1) --config $(or $(RECIPE),$(STARTER_RECIPES)/$(2).yaml) \
	$(if $(RECIPE),,$(if $(3),--model_name_or_path $(STARTER_OUT)/$(3))) \
	$(if $(call train_out,$(2)),--output_dir $(call train_out,$(2))) $(ARGS)

.PHONY: train-stage0 train-stage1 train-stage2 train-stage3 train-dpo train-grpo train-starter train-multi bench-train

# Stage 0: the findings as words on the tower's last 2 feeding blocks and the projector, from the base at 168 px,
# no LLM (train/findings_words.py; MODEL_CARD.md). Stage 1 starts from it, and stages 1-3 keep the same word loss
# beside the LM loss (findings_loss / findings_heads in their recipes). STAGE0_ARGS: extra flags (e.g. '--epochs 1'
# for a smoke run; ARGS is for the accelerate stages).
STAGE0_ARGS ?=
train-stage0: ## stage 0: medsynth findings as word embeddings on the tower's last blocks + projector, no LLM (from the base)
	@test -f $(MEDSYNTH)/instances_train.jsonl || { echo "no $(MEDSYNTH)/instances_train.jsonl: run 'make data' first"; exit 1; }
	$(PY) -m train.findings_words --model base --image-size 168 --data $(MEDSYNTH) --output $(STARTER_OUT)/stage0_words --epochs 10 $(STAGE0_ARGS)

train-stage1: ## stage 1 (align: projector + the tower's last 2 feeding blocks, 168 px) on medsynth captions, from stage 0's output
	$(call train_run,train/sft.py,stage1_align_tower,stage0_words)

train-stage2: ## stage 2 (instruct: LoRA on the LLM, projector, tower blocks) on medsynth conversations, from stage 1's output
	$(call train_run,train/sft.py,stage2_instruct_lora_tower,stage1_align_tower)

# Stage 3 trains on the VQA rows merged per image (all of an image's questions, up to 16, in one conversation).
# The medsynth files come from `make data`; without them a stage says so (and `make -n` still shows the chain).
$(MEDSYNTH)/vqa_train.jsonl:
	@echo "no $@: run 'make data' first"; exit 1

$(MEDSYNTH)/vqa_train_g16.jsonl: $(MEDSYNTH)/vqa_train.jsonl
	$(PY) -m data_pipelines.group_turns --input $< --output $@ --max-turns 16 --seed 0

train-stage3: $(if $(RECIPE),,$(MEDSYNTH)/vqa_train_g16.jsonl) ## stage 3 (specialist VQA + replayed captions and conversations; LoRA on LLM and tower), from stage 2's output
	$(call train_run,train/sft.py,stage3_specialist_replay,stage2_instruct_lora_tower)

$(MEDSYNTH)/dpo_train.jsonl: $(MEDSYNTH)/vqa_train.jsonl
	$(PY) -m data_pipelines.preferences dpo-swap --input $< --output $@

train-dpo: $(if $(RECIPE),,$(MEDSYNTH)/dpo_train.jsonl) ## DPO with images (LoRA) on medsynth preference pairs, from stage 3's output
	$(call train_run,train/dpo.py,dpo,stage3_specialist_replay)

train-grpo: ## GRPO with stated-format + accuracy rewards on medsynth prompts, from stage 3's output
	$(call train_run,train/grpo.py,grpo,stage3_specialist_replay)

# The whole CPU curriculum: the stage targets above in order (stage 0 findings as words on the tower blocks 9-10 and
# the projector -> stage 1 projector + those blocks at 168 px ->
# stage 2 LoRA r8 + projector + those blocks -> stage 3 LoRA r16 on the LLM and the blocks + projector), every LoRA
# merged, so the result is a plain Llava whose change over the base is the projector, the two tower blocks and
# low-rank factors. Then the delta is written to medllava/starter/ (what `make setup`
# rebuilds the starter from) and evaluated. STARTER_OUT moves every output; ARGS applies to every stage (e.g.
# ARGS='--max_steps 2' for a smoke run, with STAGE0_ARGS='--epochs 1'); RECIPE and OUTPUT_DIR do not apply.
train-starter: ## whole starter curriculum on CPU (stage 0 -> 1 -> 2 -> 3), its delta in medllava/starter/, eval
	@test -f $(MEDSYNTH)/captions_train.jsonl || { echo "no $(MEDSYNTH)/captions_train.jsonl: run 'make data' first"; exit 1; }
	$(MAKE) --no-print-directory train-stage0
	$(MAKE) --no-print-directory train-stage1 RECIPE= OUTPUT_DIR=
	$(MAKE) --no-print-directory train-stage2 RECIPE= OUTPUT_DIR=
	$(MAKE) --no-print-directory train-stage3 RECIPE= OUTPUT_DIR=
	$(PY) -m medllava.assets save-starter --trained $(STARTER_OUT)/stage3_specialist_replay
	$(MAKE) --no-print-directory eval MODEL=$(STARTER_OUT)/stage3_specialist_replay OUT=$(STARTER_OUT)/eval
	@echo "starter curriculum done: $(STARTER_OUT)/{stage0_words,stage1_align_tower,stage2_instruct_lora_tower,stage3_specialist_replay}; delta in medllava/starter/"

# The multi-image recipe (issue 17): prior/current pairs and volume slices from `make data-multi`, grouped per instance,
# trained on top of the shipped starter (not part of train-starter's 120-minute budget).
MEDSYNTH_MULTI ?= data/medsynth_multi
$(MEDSYNTH_MULTI)/multi_train_g8.jsonl: $(MEDSYNTH_MULTI)/longitudinal_train.jsonl $(MEDSYNTH_MULTI)/volume_train.jsonl
	$(PY) -m data_pipelines.group_turns --input $(MEDSYNTH_MULTI)/longitudinal_train.jsonl \
		$(MEDSYNTH_MULTI)/volume_train.jsonl --output $@ --max-turns 8 --seed 0
$(MEDSYNTH_MULTI)/longitudinal_train.jsonl $(MEDSYNTH_MULTI)/volume_train.jsonl:
	@echo "no $@: run 'make data-multi' first"; exit 1

train-multi: $(if $(RECIPE),,$(MEDSYNTH_MULTI)/multi_train_g8.jsonl $(MEDSYNTH)/vqa_train_g16.jsonl) ## multi-image recipe (prior/current pairs, volumes) on top of the starter
	$(call train_run,train/sft.py,multi_image,)

bench-train: ## training tokens/s and peak memory of the default base at 112 px (stage 1 and stage 2/3 steps)
	$(PY) -m bench.train_throughput
