"""LM-head cost, fp32 against ``head_precision("bf16")``, on the default model's head shape.

Gemma 3 270M's head is ``[262144, 640]``; its matmul dominates every chunked loss in
:mod:`mmie.core.losses`. This bench builds a random head of that shape (no model is loaded) with
LM-like logits (a few ids per row far above the rest, maxima near 30), and times, interleaved
fp32 / bf16 so that load on a shared machine hits both alike:

- ``matmul``: the bare ``[tokens, 640] x [640, 262144]`` product;
- ``token_logprobs``: label log-probabilities, forward only (reference and evaluation passes);
- ``token_logprobs+grad``: forward and backward with a trainable hidden state (a step);
- ``ref_topk``: the retain KL's targets (k=64);
- ``topk_kl+grad``: the retain KL, forward and backward.

Each line reports the median seconds of each, their ratio (fp32 / bf16) and the largest
absolute difference of the outputs (nats). Thread count: ``--threads`` (default: torch's).

    python bench/bench_head.py                  # 128 tokens, 3 repeats: about a minute on 2 cores
    python bench/bench_head.py --tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from mmie.core import losses
from mmie.core.head_precision import head_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per call (one chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def head(vocab: int, d: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=gen) * 0.2
    weight[:64, :8] += 1.5  # a few ids that rows point at: peaked, LM-like distributions
    hidden = torch.randn(1, tokens, d, generator=gen)
    hidden[..., :8] *= 6
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    return weight, hidden, labels


def cases(weight, hidden, labels, chunk: int) -> dict[str, Callable[[], torch.Tensor]]:
    targets = losses.ref_topk(hidden, weight, k=64, chunk_size=chunk)

    def with_grad(fn):
        h = hidden.clone().requires_grad_(True)
        out = fn(h)
        out.sum().backward()
        return out.detach()

    bf16 = weight.bfloat16()
    return {
        "matmul": lambda: hidden[0] @ weight.T,
        "matmul_bf16_only": lambda: (hidden[0].bfloat16() @ bf16.T).float(),
        "token_logprobs": lambda: losses.token_logprobs(hidden, weight, labels, chunk_size=chunk),
        "token_logprobs+grad": lambda: with_grad(
            lambda h: losses.token_logprobs(h, weight, labels, chunk_size=chunk)),
        "ref_topk": lambda: losses.ref_topk(hidden, weight, k=64, chunk_size=chunk)[1],
        "topk_kl+grad": lambda: with_grad(
            lambda h: losses.topk_kl(h, weight, *targets, chunk_size=chunk)),
    }


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(fn: Callable[[], torch.Tensor], repeats: int) -> dict:
    """``fn`` under each head precision, interleaved; the fp32 runs nest inside the bf16
    block, so the weight is narrowed once (as in a run), not on every call."""
    def fp32() -> torch.Tensor:
        with head_precision("fp32"):
            return fn()

    with head_precision("bf16"):
        return interleaved({"fp32": fp32, "bf16": fn}, repeats)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weight, hidden, labels = head(args.vocab, args.d_model, args.tokens)
    fns = cases(weight, hidden, labels, chunk=args.tokens)
    matmul = {"fp32": fns.pop("matmul"), "bf16": fns.pop("matmul_bf16_only")}
    rows = {"matmul": interleaved(matmul, args.repeats)}
    rows.update({name: compare(fn, args.repeats) for name, fn in fns.items()})
    result = {"shape": [args.vocab, args.d_model], "tokens": args.tokens,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"head {args.vocab} x {args.d_model}, {args.tokens} tokens, "
              f"{result['threads']} threads (median of {args.repeats})")
        print(f"{'case':<22} {'fp32 s':>8} {'bf16 s':>8} {'ratio':>6} {'max |diff|':>11}")
        for name, r in rows.items():
            print(f"{name:<22} {r['fp32_s']:>8.3f} {r['bf16_s']:>8.3f} {r['ratio']:>6.2f} "
                  f"{r['max_abs_diff']:>11.2e}")
    return result


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict:
    """Median seconds of the fp32 and bf16 callables run in turn (the first round untimed),
    their ratio and the largest difference of their outputs."""
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    outs = {}
    for i in range(repeats + 1):
        for name in ("fp32", "bf16"):
            took, outs[name] = timed(fns[name])
            if i:
                seconds[name].append(took)
    fp32, bf16 = (statistics.median(seconds[k]) for k in ("fp32", "bf16"))
    diff = (outs["fp32"].float() - outs["bf16"].float()).abs().max().item()
    return {"fp32_s": fp32, "bf16_s": bf16, "ratio": fp32 / bf16, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
