"""Unlearn speedups against today's code path, in one run: reference cache and bf16 LM head.

The model is random, with Gemma 3 270M's shapes where the cost lies (262,144-id vocabulary,
d_model 640, MLP 2048, head_dim 256; ``--layers`` blocks, default 4 of its 18, to stay fast)
and the tiny byte tokenizer: nothing is downloaded or converted. LoRA + NPO with the top-k
retain KL on ``data/sample``, as in the demo. Measured, interleaved where it can be:

- **reference pass**: the frozen model's targets, computed (cache cold, today's path) against
  read back from ``$MMIE_HOME/cache/references`` (warm: every later arm and seed);
- **step**: the naive step (full logits and a reference forward every step,
  ``bench_unlearn_step.naive_step``), mmie's step with the fp32 head (today) and with
  ``--head-dtype bf16``, alternating on the same batches;
- **arm**: reference pass + ``--steps`` steps, today (cold, fp32) against a later arm
  (warm, bf16).

    python bench/bench_unlearn_speedups.py --threads 1  # under a minute; 5 with 2 busy threads
    python bench/bench_unlearn_speedups.py --layers 18 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unlearn_step import naive_step  # noqa: E402

from mmie.core import tiny  # noqa: E402
from mmie.core.head_precision import head_precision  # noqa: E402
from mmie.core.models import ModelSpec, loaded  # noqa: E402
from mmie.unlearn.stage import UnlearnConfig, prepare, read_data  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
ARCH = "bench270m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks (Gemma 3: 18)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def register_model(layers: int) -> None:
    """``tiny:bench270m``: Gemma 3 270M's shapes, random weights, the tiny tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def build(_: int):
        return Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
            query_pre_attn_scalar=256, max_position_embeddings=2048, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))

    tiny.TINY[ARCH] = build


def config(args: argparse.Namespace) -> UnlearnConfig:
    steps = args.steps + 2
    return UnlearnConfig(
        forget=str(SAMPLE / "hi.jsonl"), retain=(str(SAMPLE / "en.jsonl"),),
        model=ModelSpec(name=f"tiny:{ARCH}", device="cpu"), method="lora", objective="npo",
        steps=steps, batch_size=args.batch_size, max_length=args.max_length,
        checkpoint_every=0, max_samples=steps * args.batch_size)


def references(c: UnlearnConfig, lm, data) -> tuple[float, float]:
    """Seconds of the reference pass with the cache cold, then warm."""
    seconds = []
    for _ in range(2):
        prepared = prepare(c, lm, data)
        seconds.append(prepared.reference_seconds)
        prepared.trainer.close()
        prepared.adapter.remove()
    return seconds[0], seconds[1]


def steps(c: UnlearnConfig, lm, data, n: int) -> dict[str, list[float]]:
    """Naive, fp32 and bf16 steps in turn on the same batches (the first round untimed)."""
    prepared = prepare(c, lm, data)
    trainer, out = prepared.trainer, {"naive": [], "fp32": [], "bf16": []}
    try:
        with head_precision("bf16"):  # the bf16 weight copy is made once, as in a run
            for i in range(n + 1):
                took = {"naive": naive_step(trainer, i)}
                with head_precision("fp32"):
                    took["fp32"] = trainer.step(i)["seconds"]
                took["bf16"] = trainer.step(i)["seconds"]
                if i:
                    for k, v in took.items():
                        out[k].append(v)
    finally:
        trainer.close()
        prepared.adapter.remove()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_model(args.layers)
    c = config(args)
    data = read_data(c)
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(MMIE_HOME=home, MMIE_CACHE="1")
        with loaded(c.model) as lm:
            cold, warm = references(c, lm, data)
            timed = steps(c, lm, data, args.steps)
    med = {k: statistics.median(v) for k, v in timed.items()}
    result = {
        "model": f"random Gemma 3 270M shapes, {args.layers} blocks", "threads":
        torch.get_num_threads(), "batch": f"{args.batch_size} x {args.max_length}",
        "reference_cold_s": cold, "reference_warm_s": warm, "reference_ratio": cold / warm,
        "step_naive_s": med["naive"], "step_fp32_s": med["fp32"], "step_bf16_s": med["bf16"],
        "step_fp32_vs_naive": med["naive"] / med["fp32"],
        "step_bf16_vs_naive": med["naive"] / med["bf16"],
        "step_bf16_vs_fp32": med["fp32"] / med["bf16"],
        "arm_today_s": cold + c.steps * med["fp32"],
        "arm_later_s": warm + c.steps * med["bf16"]}
    result["arm_ratio"] = result["arm_today_s"] / result["arm_later_s"]
    print(json.dumps(result, indent=2) if args.json else
          "\n".join(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}"
                    for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
