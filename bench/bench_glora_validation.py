"""Validation of a gated LoRA: every item scored each time against unchanged items reused, in
one run.

Loads ``--model`` and a ``langgate`` artifact (``--gate``), builds a ``glora`` adapter on the
blocks after the gate's with small random LoRA weights (so the edit changes the texts the gate
fires on), and scores the validation split of `unlearn` (``--forget``, ``--retain`` and each
``--protect LANG=FILE``; prompt/continuation masses and the retain NLL,
:class:`mmie.unlearn.valscore.Scorer`) two ways, interleaved over ``--repeats`` rounds after an
untimed first measurement: a fresh scorer each time (every item scored: the code path before
reuse), and one scorer whose items the gate never fires on were scored at its first measurement
(:meth:`Adapter.unchanged`). Reported: the median seconds of each, their ratio, how many items
were reused, and the largest difference between the two measurements' values (batch
composition changes float rounding, nothing else).

    python bench/bench_glora_validation.py --gate runs/demo/langgate \\
      --forget runs/demo/data/forget.val.jsonl --retain runs/demo/data/retain.val.jsonl \\
      --protect ur=runs/demo/data/ur.val.jsonl --protect bn=runs/demo/data/bn.val.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mmie.core.head_precision import head_precision
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import AdapterSpec
from mmie.edits.glora import GatedLoraAdapter
from mmie.edits.langgate import load_gate
from mmie.unlearn.validation import ValidationConfig, read_validation
from mmie.unlearn.valscore import Scorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--gate", required=True)
    parser.add_argument("--forget", required=True)
    parser.add_argument("--retain", required=True)
    parser.add_argument("--protect", action="append", default=[], help="LANG=FILE; repeat")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _values(m: dict) -> list[float]:
    return [m["forget_mass"], m["retain_nll"], *m["own_mass"].values(), *m["leakage"].values()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    c = ValidationConfig(forget=args.forget, retain=args.retain,
                         protect=tuple(tuple(p.split("=", 1)) for p in args.protect))
    texts = read_validation(c, "text")
    with loaded(ModelSpec(name=args.model)) as lm, head_precision("bf16"):
        _, gate = load_gate(args.gate, lm)
        spec = AdapterSpec("glora", layers=tuple(range(gate.layer + 1, lm.n_layers)))
        adapter = GatedLoraAdapter._build(lm, spec, gate)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in adapter.params.values():
                p.normal_(0, 0.02)
        reuse = Scorer(lm, c, texts, args.max_length, 16)
        first = reuse.measure(adapter)
        times = {"every item": [], "reused": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            fresh = Scorer(lm, c, texts, args.max_length, 16).measure(adapter)
            times["every item"].append(time.perf_counter() - start)
            start = time.perf_counter()
            again = reuse.measure(adapter)
            times["reused"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    fixed = [f for flags, _ in reuse.cache.values() for f in flags]
    result = {"seconds": medians, "ratio": medians["every item"] / medians["reused"],
              "items": len(fixed), "reused_items": sum(fixed),
              "max_abs_difference": max(abs(a - b) for a, b in
                                        zip(_values(fresh), _values(again), strict=True)),
              "first_forget_mass": first["forget_mass"]}
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
