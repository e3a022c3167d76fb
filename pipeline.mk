# The pipeline, one artifact per stage; each target's manifest.json is its completion mark.
# Extra options per stage, e.g. SL_OPTS="--max-samples 100" GATE_OPTS="--n-boot 2000".
SL_OPTS ?=
SAE_OPTS ?=
UNLEARN_OPTS ?=
EVAL_OPTS ?=
GATE_OPTS ?=
COMMON := --model $(MODEL)
# The forget set is split: unlearning trains on the first TRAIN_LINES texts, evaluation prompts
# come from the rest (held out), and membership inference compares the two.
TRAIN_LINES ?= 160
SPLIT := $(OUT)/data
FORGET_TRAIN := $(SPLIT)/forget_train.jsonl
FORGET_HELDOUT := $(SPLIT)/forget_heldout.jsonl
SEED_DIRS := $(foreach s,$(SEEDS),seed$(s))
LAYERS := $(OUT)/layers/manifest.json
EVAL_ARGS = $(COMMON) --forget $(FORGET_HELDOUT) --forget-train $(FORGET_TRAIN) \
  --retain $(RETAIN) $(XLANG) $(EXTRA_EVAL) \
  --layers $(OUT)/layers --n-prompts $(N_PROMPTS) --out $(@D) --force $(EVAL_OPTS)
UNLEARN_ARGS = $(COMMON) --forget $(FORGET_TRAIN) --retain $(RETAIN) $(PROTECT) --layers $(OUT)/layers \
  --steps $(STEPS) --seed $(*:seed%=%) --out $(@D) --force $(UNLEARN_OPTS)

$(FORGET_TRAIN): $(FORGET)
	mkdir -p $(@D)
	head -n $(TRAIN_LINES) $< > $@

$(FORGET_HELDOUT): $(FORGET)
	mkdir -p $(@D)
	tail -n +$$(($(TRAIN_LINES) + 1)) $< > $@
	@test -s $@ || { echo "$(FORGET) has no texts after line $(TRAIN_LINES)" >&2; rm -f $@; exit 1; }

$(LAYERS): $(FORGET) $(RETAIN)
	$(MMIE) select-layers $(COMMON) --forget $(FORGET) --retain $(RETAIN) --out $(@D) --force \
	  $(SL_OPTS)

$(OUT)/sae/manifest.json: $(LAYERS)
	$(MMIE) train-sae $(COMMON) --layers $(OUT)/layers --forget $(FORGET) --retain $(RETAIN) \
	  --tokens $(SAE_TOKENS) --out $(@D) --force $(SAE_OPTS)

$(OUT)/eval-base/manifest.json: $(LAYERS) $(FORGET_TRAIN) $(FORGET_HELDOUT)
	$(MMIE) evaluate $(EVAL_ARGS) --arm base

$(OUT)/lora-npo/%/manifest.json: $(LAYERS) $(FORGET_TRAIN)
	$(MMIE) unlearn --method lora --objective npo $(UNLEARN_ARGS)

$(OUT)/reft-graddiff/%/manifest.json: $(LAYERS) $(FORGET_TRAIN)
	$(MMIE) unlearn --method reft --objective graddiff $(UNLEARN_ARGS)

$(OUT)/eval-lora-npo/%/manifest.json: $(OUT)/lora-npo/%/manifest.json $(FORGET_HELDOUT)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-reft-graddiff/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json $(FORGET_HELDOUT)
	$(MMIE) evaluate $(EVAL_ARGS) --adapter $(<D)

$(OUT)/eval-reft-graddiff+sae-gate/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json \
                                                    $(OUT)/sae/manifest.json $(FORGET_HELDOUT)
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
