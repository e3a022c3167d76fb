#!/usr/bin/env bash
# Run the pipeline on a folder of line-aligned text files, one per language (NTREX, FLORES).
# Usage: examples/run_parallel_corpus.sh DIR [OUT] [MODEL]
#   DIR holds e.g. hin.txt eng.txt urd.txt pan.txt ben.txt (line N is the same sentence).
#   Override the file names with FORGET=... RETAIN=... RELATED="urd pan ben".
# Example: examples/run_parallel_corpus.sh ../shared/data/ntrex128 runs/ntrex
set -euo pipefail
DIR=${1:?usage: $0 DIR [OUT] [MODEL]}
OUT=${2:-runs/corpus}
MODEL=${3:-default}
FORGET=${FORGET:-hin} RETAIN=${RETAIN:-eng} RELATED=${RELATED:-"urd pan ben"}
EXT=${EXT:-txt}

mmie data check "$DIR/$FORGET.$EXT" "$DIR/$RETAIN.$EXT" --model "$MODEL"

# language ID speaks ISO 639-1: map three-letter file names to the codes it reports
iso() { case $1 in hin) echo hi;; eng) echo en;; urd) echo ur;; pan) echo pa;; ben) echo bn;;
        *) echo "$1";; esac; }

xlang=() protect=()
for lang in $RELATED; do
  [ -f "$DIR/$lang.$EXT" ] || { echo "missing $DIR/$lang.$EXT" >&2; exit 1; }
  xlang+=(--xlang "$(iso "$lang")=$DIR/$lang.$EXT")
  protect+=(--retain "$DIR/$lang.$EXT")
done

# The Makefile does the rest, one stage at a time; re-running skips what is up to date.
make pipeline MODEL="$MODEL" OUT="$OUT" FORGET="$DIR/$FORGET.$EXT" RETAIN="$DIR/$RETAIN.$EXT" \
  XLANG="${xlang[*]}" PROTECT="${protect[*]}" EXTRA_EVAL="" \
  ARMS="lora-npo reft-graddiff" MMIE=mmie
