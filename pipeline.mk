# The pipeline, one artifact per stage; each target's manifest.json is its completion mark.
# ARMS picks the arms: glora-redirect, lora-redirect, lora-npo, reft-graddiff,
# reft-graddiff+sae-gate.
# Extra options per stage, e.g. SL_OPTS="--max-samples 100" GATE_OPTS="--n-boot 2000".
SL_OPTS ?=
SAE_OPTS ?=
UNLEARN_OPTS ?=
GATE_OPTS ?=
COMMON := --model $(MODEL)
# Every text file is cut the same way (the sample files are line-aligned): lines 1-TRAIN_LINES
# train the edit, the next VAL_LINES choose its checkpoint (--val-*), the rest are the held-out
# test texts that evaluate and gate report on. No text is both trained or selected on and
# reported; membership inference compares the forget train and test splits.
TRAIN_LINES ?= 130
VAL_LINES ?= 30
SPLIT := $(OUT)/data
SPLIT_DONE := $(SPLIT)/.done
SPLIT_SRC = forget=$(FORGET) retain=$(RETAIN) $(foreach l,$(PROTECT_LANGS),$(l)=$(DATA)/$(l).jsonl) \
  $(if $(ROMANIZED),romanized=$(ROMANIZED))
SEED_DIRS := $(foreach s,$(SEEDS),seed$(s))
LAYERS := $(OUT)/layers/manifest.json
EVAL_ARGS = $(COMMON) --forget $(SPLIT)/forget.test.jsonl --forget-train $(SPLIT)/forget.train.jsonl \
  --retain $(SPLIT)/retain.test.jsonl $(foreach l,$(PROTECT_LANGS),--xlang $(l)=$(SPLIT)/$(l).test.jsonl) \
  $(if $(ROMANIZED),--romanized $(SPLIT)/romanized.test.jsonl) $(EXTRA_EVAL) \
  --layers $(OUT)/layers --n-prompts $(N_PROMPTS) --out $(@D) --force $(EVAL_OPTS)
# The first retain set is English, line-aligned with the forget texts: redirect's alternative.
UNLEARN_ARGS = $(COMMON) --forget $(SPLIT)/forget.train.jsonl --retain $(SPLIT)/retain.train.jsonl \
  $(foreach l,$(PROTECT_LANGS),--retain $(SPLIT)/$(l).train.jsonl) \
  --val-forget $(SPLIT)/forget.val.jsonl --val-retain $(SPLIT)/retain.val.jsonl \
  $(foreach l,$(PROTECT_LANGS),--val-protect $(l)=$(SPLIT)/$(l).val.jsonl) --val-every $(VAL_EVERY) \
  --steps $(STEPS) --seed $(*:seed%=%) --out $(@D) --force $(UNLEARN_OPTS)

$(SPLIT_DONE): $(FORGET) $(RETAIN) $(foreach l,$(PROTECT_LANGS),$(DATA)/$(l).jsonl) $(ROMANIZED)
	mkdir -p $(@D)
	v=$$(($(TRAIN_LINES) + 1)); t=$$(($(TRAIN_LINES) + $(VAL_LINES))); \
	for pair in $(SPLIT_SRC); do \
	  name=$${pair%%=*}; src=$${pair#*=}; \
	  sed -n "1,$(TRAIN_LINES)p" $$src > $(@D)/$$name.train.jsonl; \
	  sed -n "$$v,$${t}p" $$src > $(@D)/$$name.val.jsonl; \
	  tail -n +$$((t + 1)) $$src > $(@D)/$$name.test.jsonl; \
	  test -s $(@D)/$$name.test.jsonl || { echo "$$src has no texts after line $$t" >&2; exit 1; }; \
	done
	touch $@

$(LAYERS): $(SPLIT_DONE)
	$(MMIE) select-layers $(COMMON) --forget $(SPLIT)/forget.train.jsonl \
	  --retain $(SPLIT)/retain.train.jsonl --out $(@D) --force \
	  $(SL_OPTS)

$(OUT)/sae/manifest.json: $(LAYERS)
	$(MMIE) train-sae $(COMMON) --layers $(OUT)/layers --forget $(SPLIT)/forget.train.jsonl \
	  --retain $(SPLIT)/retain.train.jsonl \
	  --tokens $(SAE_TOKENS) --out $(@D) --force $(SAE_OPTS)

$(OUT)/eval-base/manifest.json: $(LAYERS) $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --arm base

$(OUT)/lora-npo/%/manifest.json: $(LAYERS) $(SPLIT_DONE)
	$(MMIE) unlearn --method lora --objective npo $(UNLEARN_ARGS)

# On-policy retain texts: each protected training prompt with the base model's own continuation
# (kept when it is in that language), so the retain loss also covers what the model writes
# after a sentence ends (README, "Selective forgetting"). The validation splits' continuations
# (for the language gate, below) come from the same call: one model load for every file, each
# file continued as a call of its own would.
CONT := $(foreach l,$(PROTECT_LANGS),$(SPLIT)/$(l).cont.jsonl)
VAL_CONT := $(foreach l,$(PROTECT_LANGS),$(SPLIT)/$(l).val.cont.jsonl)
$(SPLIT)/.cont.done: $(SPLIT_DONE)
	$(MMIE) data continue $(foreach l,$(PROTECT_LANGS),$(SPLIT)/$(l).train.jsonl $(SPLIT)/$(l).val.jsonl) \
	  $(foreach l,$(PROTECT_LANGS),--lang $(l) --lang $(l)) \
	  $(foreach l,$(PROTECT_LANGS),--out $(SPLIT)/$(l).cont.jsonl --out $(SPLIT)/$(l).val.cont.jsonl) \
	  $(COMMON) --head-dtype bf16 --force $(CONT_OPTS)
	touch $@
$(CONT) $(VAL_CONT): $(SPLIT)/.cont.done ;

# The selective arm: LoRA trained to continue each Hindi prompt with its aligned English
# sentence, KL to the frozen model on English and on the protected languages' continuations,
# checkpoint chosen on validation.
REDIRECT_ARGS = $(COMMON) --forget $(SPLIT)/forget.train.jsonl --retain $(SPLIT)/retain.train.jsonl \
  $(foreach f,$(CONT),--retain $(f)) --alternative $(SPLIT)/retain.train.jsonl \
  --val-forget $(SPLIT)/forget.val.jsonl --val-retain $(SPLIT)/retain.val.jsonl \
  $(foreach l,$(PROTECT_LANGS),--val-protect $(l)=$(SPLIT)/$(l).val.jsonl) --val-every $(VAL_EVERY) \
  --steps $(STEPS) --seed $(*:seed%=%) --out $(@D) --force $(UNLEARN_OPTS)
$(OUT)/lora-redirect/%/manifest.json: $(LAYERS) $(SPLIT_DONE) $(CONT)
	$(MMIE) unlearn --method lora --objective redirect $(REDIRECT_OPTS) $(REDIRECT_ARGS)

# The language gate (mmie langgate): a probe on one block's output (of GATE_LAYERS, the one with
# the widest validation margin), fitted on the train
# splits (Hindi and romanized Hindi against English, the protected languages and what the base
# model itself writes after their prompts), its threshold set on the validation splits (the same
# kinds of text). Without the model-written texts the gate fired on Bengali answers that carry
# Latin-script words (README, "A gated edit").
GATE_LAYERS ?= 4 6 8
LANGGATE_OPTS ?=
$(OUT)/langgate/manifest.json: $(SPLIT_DONE) $(CONT) $(VAL_CONT)
	$(MMIE) langgate $(COMMON) $(foreach l,$(GATE_LAYERS),--layer $(l)) --positive hi=$(SPLIT)/forget.train.jsonl \
	  $(if $(ROMANIZED),--positive romanized=$(SPLIT)/romanized.train.jsonl) \
	  --negative en=$(SPLIT)/retain.train.jsonl \
	  $(foreach l,$(PROTECT_LANGS),--negative $(l)=$(SPLIT)/$(l).train.jsonl \
	    --negative $(l).cont=$(SPLIT)/$(l).cont.jsonl) \
	  --val-positive hi=$(SPLIT)/forget.val.jsonl \
	  $(if $(ROMANIZED),--val-positive romanized=$(SPLIT)/romanized.val.jsonl) \
	  --val-negative en=$(SPLIT)/retain.val.jsonl \
	  $(foreach l,$(PROTECT_LANGS),--val-negative $(l)=$(SPLIT)/$(l).val.jsonl \
	    --val-negative $(l).cont=$(SPLIT)/$(l).val.cont.jsonl) \
	  --out $(@D) --force $(LANGGATE_OPTS)

# The gated selective arm: the redirect LoRA behind the language gate, on the blocks after
# the gate's block. Where the gate does not fire the model is the base model, so the retain loss on
# those texts is zero; English keeps the retain slot the objective needs.
GLORA_OPTS ?= --objective-opt base=none --max-length 96 --lr 3e-4 --head-dtype bf16
GLORA_ARGS = $(COMMON) --forget $(SPLIT)/forget.train.jsonl --retain $(SPLIT)/retain.train.jsonl \
  --alternative $(SPLIT)/retain.train.jsonl \
  --val-forget $(SPLIT)/forget.val.jsonl --val-retain $(SPLIT)/retain.val.jsonl \
  $(foreach l,$(PROTECT_LANGS),--val-protect $(l)=$(SPLIT)/$(l).val.jsonl) --val-every $(VAL_EVERY) \
  --steps $(STEPS) --seed $(*:seed%=%) --out $(@D) --force $(UNLEARN_OPTS)
$(OUT)/glora-redirect/%/manifest.json: $(OUT)/langgate/manifest.json $(SPLIT_DONE)
	$(MMIE) unlearn --method glora --gate-probe $(OUT)/langgate --objective redirect \
	  $(GLORA_OPTS) $(GLORA_ARGS)

$(OUT)/reft-graddiff/%/manifest.json: $(LAYERS) $(SPLIT_DONE)
	$(MMIE) unlearn --method reft --objective graddiff --layers $(OUT)/layers $(UNLEARN_ARGS)

$(OUT)/eval-lora-npo/%/manifest.json: $(OUT)/lora-npo/%/manifest.json $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-lora-redirect/%/manifest.json: $(OUT)/lora-redirect/%/manifest.json $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-glora-redirect/%/manifest.json: $(OUT)/glora-redirect/%/manifest.json $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-reft-graddiff/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-reft-graddiff+sae-gate/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json \
                                                    $(OUT)/sae/manifest.json $(SPLIT_DONE)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D) --sae $(OUT)/sae --sae-gate

EVALS := $(foreach a,$(ARMS),$(foreach s,$(SEED_DIRS),$(OUT)/eval-$(a)/$(s)/manifest.json))

$(OUT)/gate/manifest.json: $(OUT)/eval-base/manifest.json $(EVALS)
	$(MMIE) gate --baseline $(OUT)/eval-base $(foreach e,$(EVALS),--eval $(patsubst %/,%,$(dir $(e)))) \
	  --out $(@D) --force $(GATE_OPTS)

$(OUT)/report.html: $(OUT)/gate/manifest.json
	$(MMIE) report $(OUT) --out $@

.PHONY: pipeline
pipeline: $(OUT)/report.html
	@echo "report: $(OUT)/report.html"
