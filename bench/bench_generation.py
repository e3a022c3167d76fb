"""Benchmark: plain ``model.generate`` (dynamic KV cache) vs mmie's static-cache path.

On CUDA: a Qwen2.5-1.5B-shaped model with random weights (bfloat16), batch 64, 128 new
tokens; mmie's path uses a static cache and lets transformers compile the decode step. On CPU
(no GPU): a small Qwen2 shape, batch 8, 16 new tokens, static cache without compile, so the
script ends in well under two minutes. Both paths decode greedily from the same prompts.
Reported: new tokens per second (best of ``--repeats`` after one warm-up) and their ratio.

    python bench/bench_generation.py [--device cpu|cuda] [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from mmie.core.artifacts import ModelIdentity
from mmie.core.generation import GenerationSettings, encode_prompts, generate, left_pad
from mmie.core.models import LoadedModel, ModelSpec, resolve_blocks
from mmie.core.tiny import build_tokenizer

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936)
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=704, vocab_size=32000)


@dataclass(frozen=True)
class Plan:
    shape: dict
    batch: int
    new_tokens: int
    prompt_chars: int
    dtype: torch.dtype


PLANS = {"cuda": Plan(QWEN_1_5B, 64, 128, 64, torch.bfloat16),
         "cpu": Plan(SMALL, 8, 16, 32, torch.float32)}


def build(plan: Plan, device: str) -> LoadedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(**plan.shape, max_position_embeddings=4096, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(plan.dtype).eval()
    identity = ModelIdentity("bench:qwen2", "Qwen2ForCausalLM", config.num_hidden_layers,
                             config.hidden_size, config.vocab_size)
    return LoadedModel(model, tokenizer, identity, resolve_blocks(model),
                       ModelSpec(name="tiny:qwen2", device=device))


def prompts(plan: Plan) -> list[str]:
    rng = random.Random(0)
    words = ["the", "model", "forgets", "language", "हिन्दी", "اردو", "ਪੰਜਾਬੀ", "বাংলা", "and"]
    out = []
    for _ in range(plan.batch):
        text = ""
        while len(text) < plan.prompt_chars * rng.uniform(0.5, 1.0):
            text += rng.choice(words) + " "
        out.append(text.strip())
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_generate(lm: LoadedModel, texts: list[str], plan: Plan) -> int:
    """transformers' default path: dynamic cache, no compile; returns new tokens produced."""
    rows = encode_prompts(lm, texts, 256)
    ids, mask = left_pad(rows, lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return int(out[:, ids.shape[1]:].numel())


def mmie_generate(lm: LoadedModel, texts: list[str], plan: Plan, compile_: bool) -> int:
    settings = GenerationSettings(max_new_tokens=plan.new_tokens, batch_size=plan.batch,
                                  static_cache=True, compile=compile_)
    return sum(g.n_tokens + g.finished for g in generate(lm, texts, settings))


def best_rate(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection and (for the static path) compilation
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        tokens = fn()
        _sync(device)
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    plan = PLANS["cuda" if args.device.startswith("cuda") else "cpu"]
    compile_ = args.device.startswith("cuda") and not args.no_compile
    lm = build(plan, args.device)
    texts = prompts(plan)
    plain = best_rate(lambda: plain_generate(lm, texts, plan), args.device, args.repeats)
    ours = best_rate(lambda: mmie_generate(lm, texts, plan, compile_), args.device, args.repeats)
    print(f"device {args.device}  shape {plan.shape}  batch {plan.batch}  "
          f"new tokens {plan.new_tokens}  dtype {str(plan.dtype).removeprefix('torch.')}")
    label = "mmie static cache" + (" + compile" if compile_ else "")
    print(f"{'default generate (dynamic cache)':36s} {plain:10.1f} new tokens/s")
    print(f"{label:36s} {ours:10.1f} new tokens/s")
    print(f"ratio mmie / default: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
