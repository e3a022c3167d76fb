#!/usr/bin/env bash
# Re-evaluate a saved adapter on other prompts: no retraining, just a new eval artifact.
# Usage: examples/reevaluate_adapter.sh ADAPTER_DIR PROMPTS_FILE [OUT] [MODEL]
#   PROMPTS_FILE: Hindi texts (.jsonl with "text", or .txt); their first halves become prompts.
# The adapter's manifest names its base model; mmie refuses to apply it to another one.
set -euo pipefail
ADAPTER=${1:?usage: $0 ADAPTER_DIR PROMPTS_FILE [OUT] [MODEL]}
PROMPTS=${2:?usage: $0 ADAPTER_DIR PROMPTS_FILE [OUT] [MODEL]}
OUT=${3:-runs/reeval}
MODEL=${4:-default}

common=(--model "$MODEL" --forget "$PROMPTS" --retain data/sample/en.jsonl
        --n-prompts 50 --max-new-tokens 64 --force)
# The base model on the same prompts, then the adapter, then the adapter plus the SAE gate
# (uncomment when an SAE artifact exists).
mmie evaluate "${common[@]}" --arm base --out "$OUT/base"
mmie evaluate "${common[@]}" --adapter "$ADAPTER" --out "$OUT/adapter"
# mmie evaluate "${common[@]}" --adapter "$ADAPTER" --sae runs/demo/sae --sae-gate \
#   --out "$OUT/adapter+sae-gate"
mmie gate --baseline "$OUT/base" --eval "$OUT/adapter" --out "$OUT/gate" --force
