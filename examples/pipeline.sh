#!/usr/bin/env bash
# The mmie pipeline, one stage at a time, on the embedded model and the sample data.
# Every stage writes an artifact folder that the next stage reads (and verifies).
# Usage: examples/pipeline.sh [OUT] [MODEL]     (run from the repository root)
set -euo pipefail
OUT=${1:-runs/example}
MODEL=${2:-default}
D=data/sample
SEED=1

# 1. Which layers separate Hindi from English (and share the least structure)?
mmie select-layers --model "$MODEL" --forget $D/hi.jsonl --retain $D/en.jsonl \
  --max-samples 100 --out "$OUT/layers" --force

# 2. Sparse autoencoders on those layers; the latents tied to Hindi.
mmie train-sae --model "$MODEL" --layers "$OUT/layers" --forget $D/hi.jsonl \
  --retain $D/en.jsonl --tokens 30000 --out "$OUT/sae" --force

# 3. Unlearn: LoRA + NPO. The related languages go into the retain mix so they are protected.
mmie unlearn --model "$MODEL" --method lora --objective npo --layers "$OUT/layers" \
  --forget $D/hi.jsonl --retain $D/en.jsonl --retain $D/ur.jsonl --retain $D/pa.jsonl \
  --retain $D/bn.jsonl --steps 40 --seed $SEED --out "$OUT/lora-npo" --force

# 4. Evaluate the base model and the unlearned one on the same prompts.
EVAL=(--model "$MODEL" --forget $D/hi.jsonl --retain $D/en.jsonl
      --xlang ur=$D/ur.jsonl --xlang pa=$D/pa.jsonl --xlang bn=$D/bn.jsonl
      --romanized $D/hi_latn.jsonl --mixed $D/hi_en_mixed.jsonl
      --adversarial $D/adversarial_hi.jsonl --layers "$OUT/layers" --force)
mmie evaluate "${EVAL[@]}" --arm base --out "$OUT/eval-base"
mmie evaluate "${EVAL[@]}" --adapter "$OUT/lora-npo" --out "$OUT/eval-lora-npo"

# 5. Gate: bootstrap CIs and BH-FDR; PROCEED or STOP.
mmie gate --baseline "$OUT/eval-base" --eval "$OUT/eval-lora-npo" --out "$OUT/gate" --force

# One HTML page with everything.
mmie report "$OUT" --out "$OUT/report.html"
