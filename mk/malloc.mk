# glibc malloc keeps freed memory instead of handing it back to the kernel after every step: by default, CPU
# training and batched generation spend a large share of their time in the kernel zeroing fresh pages for the
# same activations again (stage 3 on grouped VQA: 23 -> 14 s per step; `python -m bench.train_throughput
# --malloc both` measures it, reading its "keep" values from this file). No effect outside glibc.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824
