"""SAE training throughput: mmie's sparse-kernel step against a naive dense TopK step.

Both start from the same weights and see the same batch, in the same process, so their ratio
is meaningful even on a noisy machine. On CUDA both run under bf16 autocast and the script also
times one bf16 matmul of the encoder's shape: ``tokens / (2 * matmul time)`` is the throughput
that two such matmuls alone would allow (the roofline a step with two dense big matmuls cannot
beat). A second table compares sparse-decode implementations (forward + backward).

    python bench/bench_sae.py                      # d = 640 and 1536, device auto
    python bench/bench_sae.py --d 640 --steps 3 --batch 512
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmie.sae.modules import (
    SaeConfig,
    build_sae,
    dense_topk_reference,
    make_optimizer,
    train_step,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[640, 1536], help="model widths")
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--arch", default="topk", help="our architecture (baseline is TopK)")
    parser.add_argument("--batch", type=int, default=None,
                        help="tokens per step (default 4096 on CUDA, 1024 on CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (4096 if cuda else 1024)
    args.steps = args.steps or (20 if cuda else 3)
    args.autocast = torch.bfloat16 if cuda else None
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], steps: int, warmup: int, device: str) -> float:
    """Median wall time of ``fn`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_training(d: int, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of ``train_step`` and of ``dense_topk_reference`` from identical weights."""
    gen = torch.Generator().manual_seed(args.seed)
    cfg = SaeConfig(d_model=d, expansion=args.expansion, k=args.k, arch=args.arch)
    ours = build_sae(cfg, device=args.device, generator=gen)
    dense = build_sae(SaeConfig(d_model=d, expansion=args.expansion, k=args.k))
    dense.load_state_dict({k: v for k, v in copy.deepcopy(ours.state_dict()).items()
                           if k != "threshold"})
    dense.to(args.device)
    x = torch.randn(args.batch, d, generator=gen).to(args.device)
    opt_ours, _ = make_optimizer(ours, 1e-4)
    opt_dense, _ = make_optimizer(dense, 1e-4)
    t_ours = seconds_per_call(lambda: train_step(ours, opt_ours, x, autocast_dtype=args.autocast),
                              args.steps, args.warmup, args.device)
    t_dense = seconds_per_call(
        lambda: dense_topk_reference(dense, opt_dense, x, autocast_dtype=args.autocast),
        args.steps, args.warmup, args.device)
    return {"ours": args.batch / t_ours, "dense": args.batch / t_dense}


def bench_roofline(d: int, args: argparse.Namespace) -> dict[str, float]:
    """bf16 matmul ``[batch, d] @ [d, n]``: its TFLOP/s and the two-matmul tokens/s bound."""
    n = args.expansion * d
    a = torch.randn(args.batch, d, device=args.device, dtype=torch.bfloat16)
    b = torch.randn(d, n, device=args.device, dtype=torch.bfloat16)
    t = seconds_per_call(lambda: a @ b, max(args.steps, 10), 3, args.device)
    return {"tflops": 2 * args.batch * d * n / t / 1e12, "roofline": args.batch / (2 * t)}


def bench_decode(d: int, args: argparse.Namespace) -> dict[str, float]:
    """Decode forward + backward in ms: ours (sorted segment sum, which also serves grouped
    matryoshka / AuxK bags) vs a plain 2-D ``embedding_bag`` and gathered rows + ``bmm``."""
    gen = torch.Generator().manual_seed(args.seed)
    sae = build_sae(SaeConfig(d_model=d, expansion=args.expansion, k=args.k), generator=gen)
    sae.to(args.device)
    n = sae.cfg.n_latents
    idx = torch.randint(0, n, (args.batch, args.k), generator=gen).to(args.device)
    vals = torch.rand(args.batch, args.k, generator=gen).to(args.device).requires_grad_()
    grad = torch.randn(args.batch, d, device=args.device)
    variants = {
        "ours": lambda: sae.decode_sparse(vals, idx),
        "embedding_bag": lambda: F.embedding_bag(idx, sae.W_dec, mode="sum",
                                                 per_sample_weights=vals) + sae.b_dec,
        "index_bmm": lambda: torch.bmm(vals[:, None, :], sae.W_dec[idx])[:, 0] + sae.b_dec,
    }
    out = {}
    for name, fn in variants.items():
        t = seconds_per_call(lambda fn=fn: fn().backward(grad), args.steps, args.warmup,
                             args.device)
        out[name] = t * 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    print(f"device={args.device} batch={args.batch} k={args.k} expansion={args.expansion} "
          f"arch={args.arch} steps={args.steps} autocast={args.autocast} "
          f"threads={torch.get_num_threads()}")
    header = f"{'d':>6} {'latents':>8} {'ours tok/s':>12} {'dense tok/s':>12} {'ratio':>6}"
    print(header + (f" {'bf16 TFLOP/s':>13} {'2-matmul tok/s':>15}" if cuda else ""))
    for d in args.d:
        r = bench_training(d, args)
        line = (f"{d:>6} {args.expansion * d:>8} {r['ours']:>12,.0f} {r['dense']:>12,.0f} "
                f"{r['ours'] / r['dense']:>6.2f}")
        if cuda:
            roof = bench_roofline(d, args)
            line += f" {roof['tflops']:>13.1f} {roof['roofline']:>15,.0f}"
        print(line)
    print(f"\ndecode forward+backward, ms  {'d':>6} {'ours':>8} {'embedding_bag 2d':>17} "
          f"{'index+bmm':>10}")
    for d in args.d:
        r = bench_decode(d, args)
        print(f"{'':28} {d:>6} {r['ours']:>8.1f} {r['embedding_bag']:>17.1f} "
              f"{r['index_bmm']:>10.1f}")


if __name__ == "__main__":
    main()
