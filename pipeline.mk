# The pipeline, one artifact per stage; each target's manifest.json is its completion mark.
COMMON := --model $(MODEL)
SEED_DIRS := $(foreach s,$(SEEDS),seed$(s))

$(OUT)/layers/manifest.json: $(FORGET) $(RETAIN)
	$(MMIE) select-layers $(COMMON) --forget $(FORGET) --retain $(RETAIN) --out $(OUT)/layers --force

$(OUT)/sae/manifest.json: $(OUT)/layers/manifest.json
	$(MMIE) train-sae $(COMMON) --layers $(OUT)/layers --forget $(FORGET) --retain $(RETAIN) \
	  --tokens $(SAE_TOKENS) --out $(OUT)/sae --force

$(OUT)/eval-base/manifest.json: $(FORGET) $(RETAIN)
	$(MMIE) evaluate $(COMMON) --forget $(FORGET) --retain $(RETAIN) $(XLANG) $(EXTRA_EVAL) \
	  --layers $(OUT)/layers --n-prompts $(N_PROMPTS) --arm base --out $(OUT)/eval-base --force

$(OUT)/lora-npo/%/manifest.json: $(OUT)/layers/manifest.json
	$(MMIE) unlearn $(COMMON) --method lora --objective npo --forget $(FORGET) --retain $(RETAIN) \
	  $(PROTECT) --layers $(OUT)/layers --steps $(STEPS) --seed $(*:seed%=%) --out $(@D) --force

$(OUT)/reft-graddiff/%/manifest.json: $(OUT)/layers/manifest.json
	$(MMIE) unlearn $(COMMON) --method reft --objective graddiff --forget $(FORGET) \
	  --retain $(RETAIN) $(PROTECT) --layers $(OUT)/layers --steps $(STEPS) --seed $(*:seed%=%) \
	  --out $(@D) --force

$(OUT)/eval-lora-npo/%/manifest.json: $(OUT)/lora-npo/%/manifest.json
	$(MMIE) evaluate $(COMMON) --adapter $(<D) --forget $(FORGET) --retain $(RETAIN) $(XLANG) \
	  $(EXTRA_EVAL) --layers $(OUT)/layers --n-prompts $(N_PROMPTS) --out $(@D) --force

$(OUT)/eval-reft-graddiff/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json
	$(MMIE) evaluate $(COMMON) --adapter $(<D) --forget $(FORGET) --retain $(RETAIN) $(XLANG) \
	  $(EXTRA_EVAL) --layers $(OUT)/layers --n-prompts $(N_PROMPTS) --out $(@D) --force

$(OUT)/eval-reft-graddiff+sae-gate/%/manifest.json: $(OUT)/reft-graddiff/%/manifest.json $(OUT)/sae/manifest.json
	$(MMIE) evaluate $(COMMON) --adapter $(<D) --sae $(OUT)/sae --sae-gate --forget $(FORGET) \
	  --retain $(RETAIN) $(XLANG) $(EXTRA_EVAL) --layers $(OUT)/layers --n-prompts $(N_PROMPTS) \
	  --out $(@D) --force

EVALS := $(foreach a,$(ARMS),$(foreach s,$(SEED_DIRS),$(OUT)/eval-$(a)/$(s)/manifest.json))

$(OUT)/gate/manifest.json: $(OUT)/eval-base/manifest.json $(EVALS)
	$(MMIE) gate --baseline $(OUT)/eval-base $(foreach e,$(EVALS),--eval $(dir $(e))) \
	  --out $(OUT)/gate --force

$(OUT)/report.html: $(OUT)/gate/manifest.json
	$(MMIE) report $(OUT) --out $@

.PHONY: pipeline
pipeline: $(OUT)/report.html
	@echo "report: $(OUT)/report.html"
