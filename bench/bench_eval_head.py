"""Generation with the fp32 LM head against ``evaluate --head-dtype bf16``'s, in one run.

Loads ``--model`` (default: the embedded Gemma 3 270M, whose 262,144 x 640 head is most of a
decode step) and continues the first ``--prompts`` prompts of ``data/sample`` (forget and
retain sentences alternately, their first half as `evaluate` cuts them) greedily with
`evaluate`'s settings (repetition penalty 1.2, one batch of up to 16) for ``--new-tokens``
tokens. Per thread count: an untimed round of 2 new tokens, then ``--repeats`` rounds that
time fp32 and bf16 in turn (interleaved, so load on a shared machine hits both alike), with the
bf16 weight copy made once as in a run. Reported: median seconds of each, their ratio (fp32 /
bf16), and whether every generated token was identical in every round.

    python bench/bench_eval_head.py --prompts 8                # a few minutes on 2 cores
    python bench/bench_eval_head.py --model tiny:gemma3 --json # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmie.core.data import read_texts, split_prompt
from mmie.core.generation import GenerationSettings, generate
from mmie.core.head_precision import head_precision
from mmie.core.models import ModelSpec, loaded

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def prompts(n: int) -> list[str]:
    forget, retain = (read_texts(str(SAMPLE / name), "text", limit=n)
                      for name in ("hi.jsonl", "en.jsonl"))
    mixed = [t for pair in zip(forget, retain) for t in pair][:n]
    return [split_prompt(t, 0.5)[0] for t in mixed]


def timed(lm, texts: list[str], settings: GenerationSettings,
          name: str) -> tuple[float, list[tuple[int, ...]]]:
    with head_precision(name):
        start = time.perf_counter()
        gens = generate(lm, texts, settings)
        return time.perf_counter() - start, [g.new_ids for g in gens]


def compare(lm, texts: list[str], settings: GenerationSettings, repeats: int) -> dict:
    """fp32 and bf16 generation in turn; the fp32 runs nest inside the bf16 block, so the
    bf16 weight copy is cast once (as in an `evaluate` run), not per round."""
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    tokens: dict[str, list] = {"fp32": [], "bf16": []}
    with head_precision("bf16"):
        for name in ("fp32", "bf16"):  # warm-up: allocations, kernel choice, the bf16 copy
            timed(lm, texts, replace(settings, max_new_tokens=2), name)
        for _ in range(repeats):
            for name in ("fp32", "bf16"):
                took, ids = timed(lm, texts, settings, name)
                seconds[name].append(took)
                tokens[name].append(ids)
    fp32, bf16 = (statistics.median(seconds[k]) for k in ("fp32", "bf16"))
    same = all(ids == tokens["fp32"][0] for k in tokens for ids in tokens[k])
    n_new = sum(len(ids) for ids in tokens["fp32"][0])
    return {"fp32_s": fp32, "bf16_s": bf16, "ratio": fp32 / bf16, "identical": same,
            "new_tokens": n_new}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    texts = prompts(args.prompts)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=16,
                                  repetition_penalty=1.2)  # evaluate's defaults
    rows = {}
    with loaded(ModelSpec(name=args.model, device="cpu")) as lm:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            rows[threads] = compare(lm, texts, settings, args.repeats)
        vocab, d = lm.identity.vocab_size, lm.identity.d_model
    result = {"model": args.model, "head": [vocab, d], "prompts": len(texts),
              "max_new_tokens": args.new_tokens, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {args.model} (head {vocab} x {d}), {len(texts)} prompts, "
              f"{args.new_tokens} new tokens, median of {args.repeats}")
        print(f"{'threads':>7} {'fp32 s':>8} {'bf16 s':>8} {'ratio':>6} {'identical':>9}")
        for threads, r in rows.items():
            print(f"{threads:>7} {r['fp32_s']:>8.2f} {r['bf16_s']:>8.2f} {r['ratio']:>6.2f} "
                  f"{str(r['identical']):>9}")
    return result


if __name__ == "__main__":
    main()
