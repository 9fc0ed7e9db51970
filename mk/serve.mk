# Serving: `make demo` (main Makefile) serves the default model; these serve any checkpoint and benchmark it.
.PHONY: serve bench-serve

serve: MODEL ?= default
serve: HOST ?= 127.0.0.1
serve: PORT ?= 7860
serve: SERVE_ARGS ?=
serve: ## chat + OpenAI API for any checkpoint: make serve MODEL=dir|hub-id PORT=8000 SERVE_ARGS='--dtype bfloat16'
	$(PY) -m serve --model $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

bench-serve: BENCH_ARGS ?=
bench-serve: ## streamed decode vs plain generate (fp32, bf16), answers under load, 1/4/8/16 clients batched (base)
	$(PY) -m bench.serve_latency $(BENCH_ARGS)
