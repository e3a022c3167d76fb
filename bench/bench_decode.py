"""Greedy decoding on the default model: mmie's loop against transformers' ``generate``, one run.

The prompts are `evaluate`'s: the first half of each of the first 60 test sentences of the
demo's Hindi, English and Bengali sets (``data/sample`` lines 161 on), 48 new tokens, repetition
penalty 1.2, LM head at ``--head-dtype`` (bf16, as ``make demo`` evaluates). Four ways, in one
process on the same model, each timed once after a short warm-up:

- ``transformers@16``: ``generate``, 16 prompts per batch (evaluate's path before #17);
- ``transformers@64``: ``generate``, 64 per batch;
- ``mmie@16`` and ``mmie@64``: :mod:`mmie.core.decode`, 16 and 64 per batch (64 is now
  evaluate's default).

Reported: seconds, each one's speedup over ``transformers@16``, and how many of the 180
continuations are token-identical to ``transformers@16``'s. Needs the converted default model.

    python bench/bench_decode.py                    # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmie.core import memory
from mmie.core.generation import EVAL_REPETITION_PENALTY, GenerationSettings, generate
from mmie.core.head_precision import head_precision
from mmie.core.models import ModelSpec, loaded

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
WAYS = (("transformers", 16), ("transformers", 64), ("auto", 16), ("auto", 64))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--n-prompts", type=int, default=60, help="per language")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def prompts(n: int) -> list[str]:
    out = []
    for lang in ("hi", "en", "bn"):
        lines = (SAMPLE / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()[160:160 + n]
        for line in lines:
            words = json.loads(line)["text"].split()
            out.append(" ".join(words[:max(1, len(words) // 2)]))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    memory.keep_freed_memory()  # as the CLI runs
    texts, rows = prompts(args.n_prompts), {}
    with loaded(ModelSpec(name="default")) as lm, head_precision(args.head_dtype):
        generate(lm, texts[:4], GenerationSettings(max_new_tokens=4))  # warm-up
        reference = None
        for engine, batch in WAYS:
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch,
                                          repetition_penalty=EVAL_REPETITION_PENALTY,
                                          engine=engine)
            start = time.perf_counter()
            ids = [g.new_ids for g in generate(lm, texts, settings)]
            seconds = time.perf_counter() - start
            reference = reference or ids
            name = f"{'mmie' if engine == 'auto' else engine}@{batch}"
            rows[name] = {"seconds": seconds,
                          "identical": sum(a == b for a, b in zip(ids, reference, strict=True))}
    base = rows["transformers@16"]["seconds"]
    for row in rows.values():
        row["speedup"] = base / row["seconds"]
    result = {"model": "default (Gemma 3 270M)", "head_dtype": args.head_dtype,
              "prompts": len(texts), "max_new_tokens": args.max_new_tokens, "ways": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(texts)} prompts x {args.max_new_tokens} new tokens, head {args.head_dtype}")
        for name, row in rows.items():
            print(f"{name:>16}: {row['seconds']:7.1f} s  {row['speedup']:5.2f}x  "
                  f"identical {row['identical']}/{len(texts)}")
    return result


if __name__ == "__main__":
    main()
