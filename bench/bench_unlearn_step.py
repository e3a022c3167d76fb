"""Unlearning step cost: mmie's step against a naive step, same model, batches and adapter.

mmie's step (:class:`mmie.unlearn.train.Trainer`): log-probabilities from final hidden states
through chunked LM-head matmuls (no ``[batch, tokens, vocab]`` tensor), NPO reference
log-likelihoods and retain top-k KL targets (with ``--exact``, the exact KL's reference summary,
:mod:`mmie.core.kl_stats`) precomputed once before training (timed separately, as "one-off":
one reference pass per example the schedule visits; the reference cache is off, so it is
computed here, not read back from an earlier run).

Naive step: ``model(...).logits`` for the forget and retain batches, a reference forward of both
every step (adapter disabled, no grad), and the full-vocabulary KL on retain tokens. Both run
in one process, interleaved on the *same* batches (step i of each kind sees batch i), so the
ratio is meaningful on a noisy machine. ``speedup`` compares steps; ``speedup_with_one_off``
adds the one-off reference pass spread over the steps it serves, which is the end-to-end gain
of a run that visits every example once (more when examples repeat across epochs). After the
timed steps both losses are computed on one batch: NPO and the forget NLL must agree to float
rounding, and the top-k KL must not exceed the full KL (it is the KL of a coarser distribution;
with ``--exact`` the two are the same KL and differ by the head's rounding). Each step's time is
listed too: the naive step's cost grows with the batch's padded ``tokens x vocabulary`` block,
mmie's with its real tokens, so the ratio depends on the texts the steps draw (``--steps``
changes which: the bench reads ``batch_size x (warmup + steps + 1)`` texts of each file).

On a shared CPU, pass ``--threads 1``: OpenMP barriers between two threads that other
processes keep preempting can make every small op take milliseconds.

    python bench/bench_unlearn_step.py                    # tiny:llama, seconds
    python bench/bench_unlearn_step.py --model default    # Gemma 3 270M (262k vocabulary)
    python bench/bench_unlearn_step.py --model default --exact --head-dtype bf16  # #17's step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from mmie.core import memory
from mmie.core.head_precision import head_precision
from mmie.core.models import ModelSpec, loaded
from mmie.unlearn.objectives import ObjectiveInputs
from mmie.unlearn.stage import UnlearnConfig, prepare, read_data
from mmie.unlearn.train import Trainer, collate

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama", help="tiny:llama, default, a folder")
    parser.add_argument("--method", default="lora", choices=["lora", "reft"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind")
    parser.add_argument("--top-k", type=int, default=64, help="retain KL: reference ids kept")
    parser.add_argument("--token-frac", type=float, default=1.0,
                        help="retain KL: share of retain positions scored per step")
    parser.add_argument("--exact", action="store_true",
                        help="retain KL over the full vocabulary (--retain-opt exact=true)")
    parser.add_argument("--head-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="mmie's step: LM head precision (the naive step stays fp32)")
    parser.add_argument("--malloc", default="keep", choices=["keep", "system"],
                        help="keep: freed memory reused, as the CLI sets it (mmie.core.memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> UnlearnConfig:
    steps = args.warmup + args.steps + 1
    return UnlearnConfig(
        forget=str(SAMPLE / "hi.jsonl"), retain=(str(SAMPLE / "en.jsonl"),),
        model=ModelSpec(name=args.model, device=args.device), method=args.method,
        objective="npo", retain_loss="kl", retain_options=(("top_k", str(args.top_k)),
                                                    ("token_frac", str(args.token_frac)))
        + ((("exact", "true"),) if args.exact else ()), head_dtype=args.head_dtype,
        steps=steps, batch_size=args.batch_size, max_length=args.max_length,
        checkpoint_every=0, max_samples=max(8, steps * args.batch_size))


def _seq_logp(logits: torch.Tensor, batch) -> torch.Tensor:
    logp = logits.float().log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0]
    return (logp * batch.label_mask).sum(-1)


def _logits(trainer: Trainer, batch) -> torch.Tensor:
    return trainer.lm.model(input_ids=batch.ids, attention_mask=batch.attention,
                            position_ids=batch.positions, use_cache=False).logits


def naive_losses(trainer: Trainer, step: int) -> dict[str, torch.Tensor]:
    """NPO + full KL with full logits and reference forwards, as a plain script would."""
    forget = collate(trainer.lm, [trainer.forget[i] for i in trainer.schedule.forget[step]])
    retain = collate(trainer.lm, [trainer.retain[i] for i in trainer.schedule.retain[step]])
    with torch.no_grad(), trainer.adapter.reference():
        ref_logp = _seq_logp(_logits(trainer, forget), forget)
        ref_retain = _logits(trainer, retain).float().log_softmax(-1)
    with trainer.adapter.edits():
        logp = _seq_logp(_logits(trainer, forget), forget)
        student = _logits(trainer, retain).float().log_softmax(-1)
    kl = F.kl_div(student, ref_retain, reduction="none", log_target=True).sum(-1)
    kl = (kl * retain.label_mask).sum() / retain.label_mask.sum()
    objective = trainer.plan.objective
    inputs = ObjectiveInputs(logp=logp, n_tokens=forget.label_mask.sum(-1), ref_logp=ref_logp,
                             retain_loss=kl)
    forget_loss = objective.forget_loss(inputs)
    return {"loss": forget_loss + objective.retain_term(inputs), "forget": forget_loss,
            "retain": kl, "forget_nll": -logp.sum() / forget.label_mask.sum()}


def naive_step(trainer: Trainer, step: int) -> float:
    start = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    naive_losses(trainer, step)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(list(trainer.params.values()), trainer.plan.max_grad_norm)
    trainer.optimizer.step()
    return time.perf_counter() - start


def timed(trainer: Trainer, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds of our step and of the naive step on each batch, alternating."""
    ours, naive = [], []
    for i in range(args.warmup + args.steps):
        pair = trainer.step(i)["seconds"], naive_step(trainer, i)
        if i >= args.warmup:
            ours.append(pair[0])
            naive.append(pair[1])
    return ours, naive


def compare(trainer: Trainer, step: int) -> dict[str, float]:
    """Both losses on one batch, after training moved the adapter away from the identity."""
    with torch.no_grad():
        batches = trainer.batches(step)
        ours = {k: float(v) for k, v in
                trainer.losses(batches, trainer.scales(trainer.counts(batches))).items()}
        naive = {k: float(v) for k, v in naive_losses(trainer, step).items()}
    # objectives put the weighted retain term in "retain"; NPO's default weight is 1
    return {"npo_ours": ours["forget"], "npo_naive": naive["forget"],
            "forget_nll_ours": ours["forget_nll"], "forget_nll_naive": naive["forget_nll"],
            "kl_topk": ours["retain"], "kl_full": naive["retain"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # the one-off reference pass is timed, not read back from an earlier run's cache
    os.environ["MMIE_CACHE"] = "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        memory.keep_freed_memory()
    config = bench_config(args)
    data = read_data(config)
    with loaded(config.model) as lm:
        start = time.perf_counter()
        prepared = prepare(config, lm, data)
        setup = time.perf_counter() - start
        trainer = prepared.trainer
        try:
            # the naive step calls the head module itself: it stays fp32 either way
            with head_precision(args.head_dtype):
                ours, naive = timed(trainer, args)
                check = compare(trainer, config.steps - 1)
        finally:
            prepared.adapter.remove()
        result = {
            "model": lm.identity.name, "vocab": lm.identity.vocab_size, "method": args.method,
            "batch": f"{args.batch_size} x {args.max_length}", "threads": torch.get_num_threads(),
            "retain_kl": "exact" if args.exact else f"top-{args.top_k}",
            "head_dtype": args.head_dtype, "malloc": args.malloc,
            "ours_s": statistics.median(ours), "naive_s": statistics.median(naive),
            "speedup": statistics.median(naive) / statistics.median(ours),
            "one_off_reference_s": prepared.reference_seconds,
            "speedup_with_one_off": statistics.median(naive) / (
                statistics.median(ours) + prepared.reference_seconds / config.steps),
            "setup_s": setup, "ours_steps_s": ours, "naive_steps_s": naive,
            "peak_rss_gib": psutil.Process().memory_info().rss / 2**30, **check}
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return result


def _table(r: dict) -> str:
    def show(v):
        if isinstance(v, list):
            return " ".join(f"{x:.3g}" for x in v)
        return f"{v:.4g}" if isinstance(v, float) else f"{v}"
    rows = [f"{k:>20}: {show(v)}" for k, v in r.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
