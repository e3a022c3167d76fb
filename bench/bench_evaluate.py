"""evaluate: where the time goes, and the base-model fluency pass read back, in one run.

Same random model as ``bench_unlearn_speedups.py`` (Gemma 3 270M's shapes, ``--layers``
blocks, random weights, the tiny tokenizer), base arm on ``data/sample``. The evaluation runs
twice with ``MMIE_PROFILE=1`` and a fresh ``$MMIE_HOME``: first as today (every pass
computed), then again, when the fluency pass comes from ``$MMIE_HOME/cache/fluency``. Reported:
both wall times and their ratio, whether the two ``samples.jsonl`` files are byte-identical,
a perplexity pass as before (log p and Min-K%++ z-scores) against the log-p-only pass that
perplexity and fluency use now (fastest of 2, interleaved; largest log-p difference), and the
first run's phase table (:mod:`mmie.core.profile`).

    python bench/bench_evaluate.py            # about two minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unlearn_speedups import ARCH, register_model  # noqa: E402

from mmie.core import profile  # noqa: E402
from mmie.core.generation import score, text_items  # noqa: E402
from mmie.core.models import ModelSpec, loaded  # noqa: E402
from mmie.evaluate.stage import EvalConfig, run  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def score_passes(config: EvalConfig, repeats: int = 2) -> dict:
    """A perplexity pass as before (log p and Min-K%++ z-scores) against log p only
    (``score(z=False)``, what perplexity and fluency use now), interleaved on the same texts."""
    texts = [json.loads(line)["text"] for line in
             (SAMPLE / "en.jsonl").read_text(encoding="utf-8").splitlines()[:16]]
    seconds: dict[bool, list[float]] = {True: [], False: []}
    with loaded(config.model) as lm:
        items = text_items(lm, texts, config.max_length)
        for i in range(repeats + 1):
            for z in (True, False):
                start = time.perf_counter()
                got = score(lm, items, batch_size=config.batch_size, z=z)
                if i:
                    seconds[z].append(time.perf_counter() - start)
                if z:
                    full = got
    diff = max(abs(a - b) for s, t in zip(full, got, strict=True)
               for a, b in zip(s.logprobs, t.logprobs, strict=True))
    before, now = min(seconds[True]), min(seconds[False])
    return {"score_with_z_s": before, "score_logp_only_s": now, "score_ratio": before / now,
            "score_max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_model(args.layers)
    config = EvalConfig(model=ModelSpec(name=f"tiny:{ARCH}", device="cpu"),
                        forget=str(SAMPLE / "hi.jsonl"), retain=str(SAMPLE / "en.jsonl"),
                        n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size)
    seconds, arts = [], []
    with tempfile.TemporaryDirectory() as root:
        os.environ.update(MMIE_HOME=str(Path(root) / "home"), MMIE_CACHE="1", MMIE_PROFILE="1")
        for name in ("cold", "warm"):
            profile.reset()
            start = time.perf_counter()
            arts.append(run(config, Path(root) / name))
            seconds.append(time.perf_counter() - start)
        same = arts[0].read_text("samples.jsonl") == arts[1].read_text("samples.jsonl")
        table = arts[0].metrics["profile"]
    result = {"model": f"random Gemma 3 270M shapes, {args.layers} blocks",
              "threads": torch.get_num_threads(), "cold_s": seconds[0], "warm_s": seconds[1],
              "ratio": seconds[0] / seconds[1], "samples_identical": same,
              **score_passes(config), "profile": table}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k != "profile":
                print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
        print(profile.render(table))
    return result


if __name__ == "__main__":
    main()
