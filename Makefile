# mmie: every stage is a file target, so a stage re-runs only when its inputs changed.
#   make demo                      full pipeline on the embedded model and data/sample
#   make full MODEL=... FORGET=... RETAIN=... SEEDS="1 2 3" ARMS="lora-npo reft-graddiff"
#   make test / make lint
# On a CUDA machine install a CUDA torch instead of the CPU pin: make setup TORCH=torch

SHELL := /bin/bash
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
MMIE := $(VENV)/bin/mmie
STAMP := $(VENV)/.installed

MODEL ?= default
DATA ?= data/sample
FORGET ?= $(DATA)/hi.jsonl
RETAIN ?= $(DATA)/en.jsonl
# Protected languages: $(DATA)/<lang>.jsonl, split like the forget set, kept by the edit (retain
# and validation) and checked by the gate (xlang sets on their test split).
PROTECT_LANGS ?= ur pa bn
ROMANIZED ?= $(DATA)/hi_latn.jsonl
EXTRA_EVAL ?= --mixed $(DATA)/hi_en_mixed.jsonl --adversarial $(DATA)/adversarial_hi.jsonl
OUT ?= runs/demo
SEEDS ?= 1
STEPS ?= 40
VAL_EVERY ?= 5
# 60 prompts per set: the smallest sample at which every default gate can pass (the forget-rate
# gate needs n >= 59 for 0/n to bound the rate below 0.05; docs/gates.md has the min n table).
N_PROMPTS ?= 60
SAE_TOKENS ?= 30000
ARMS ?= glora-redirect lora-npo
# The selective arm's settings (README, "Selective forgetting: what was measured").
REDIRECT_OPTS ?= --objective-opt base=none --objective-opt retain_weight=8 \
  --retain-weight bn.cont=2 --max-length 96 --lr 3e-4 --head-dtype bf16
# bf16 LM head in evaluate: greedy generations identical to fp32, about 2x faster on AVX-512 BF16.
# bf16 body matmuls: faster again, but some continuations change (README, "Speed on a small
# CPU"); the baseline and every arm are evaluated alike, which gate checks.
EVAL_OPTS ?= --head-dtype bf16 --body-dtype bf16

.PHONY: setup test test-fast lint demo full clean-demo
.DELETE_ON_ERROR:
.SECONDARY:  # keep every stage's artifact: they are the pipeline's results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check mmie tests bench

include pipeline.mk

# Quick settings for the demo; `make full` uses each command's defaults.
demo: $(STAMP)
	$(MAKE) --no-print-directory pipeline SL_OPTS="--max-samples 100" SAE_OPTS="--max-heldout 40"
full: $(STAMP)
	$(MAKE) --no-print-directory pipeline OUT=$(if $(filter command line,$(origin OUT)),$(OUT),runs/full)
clean-demo:
	rm -rf $(OUT)

# Validation-chosen checkpoints and the sweep (README: "Choosing on validation"). `splits` cuts
# the line-aligned sample files into train (lines 1-130), validation (131-160) and test
# (161-220, 60 texts: the smallest set on which every default gate can pass), as `make demo`
# does; `sweep` runs configs/sweep.toml on them (the test split is read once, for the winner).
SPLITS := runs/splits
SPLIT_LANGS := hi en ur pa bn hi_latn
$(SPLITS)/.done: $(foreach l,$(SPLIT_LANGS),$(DATA)/$(l).jsonl)
	mkdir -p $(SPLITS)
	for l in $(SPLIT_LANGS); do \
	  sed -n 1,130p $(DATA)/$$l.jsonl > $(SPLITS)/$$l.train.jsonl; \
	  sed -n 131,160p $(DATA)/$$l.jsonl > $(SPLITS)/$$l.val.jsonl; \
	  sed -n 161,220p $(DATA)/$$l.jsonl > $(SPLITS)/$$l.test.jsonl; \
	done
	touch $@
splits: $(SPLITS)/.done
sweep: $(STAMP) $(SPLITS)/.done
	$(MMIE) sweep configs/sweep.toml --model $(MODEL) --out $(OUT)/sweep $(SWEEP_OPTS)
.PHONY: splits sweep
