"""`train-sae` data-parallel: 2 torchrun processes (gloo, CPU) train the 1-process SAEs.

Tolerance. Both runs take the same steps on the same global batches; they differ only in the
order float32 sums are taken (each process sums its rows, then gloo adds the two halves and
DDP averages; the encoder matmul runs on fewer rows). That is rounding at float32's 1.2e-7
relative precision, carried through 10 Adam steps. Measured on this CPU: SAE weights differ by
at most 3e-8 (TopK) and 6e-8 (BatchTopK, resumed), logged losses by 1.8e-7 and 2.4e-7, one
sharded step's gradients by 6e-8. ``WEIGHTS`` / ``CURVE`` / ``GRADS`` leave a margin of ~200x
on that, yet stay 100x below one Adam step (lr 2.3e-3) and far below what a wrong batch, shard
or counter would cause (a dead-latent counter that misses the other process's tokens changes
which latents AuxK trains at once). Adam is blind to a constant gradient scale, so the
gradient test is what checks the loss scaling against DDP's averaging.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmie.core.artifacts import load
from mmie.core.models import ModelSpec
from mmie.train_sae.stage import TrainSaeConfig, default_checkpoint_dir, run
from tests.helpers import StopAfter, launch_env

from .conftest import EN, HI, write_jsonl

WEIGHTS, CURVE, GRADS = 1e-5, 5e-5, 1e-6
CLI = ["--model", "tiny:llama", "--device", "cpu", "--layer", "1", "--layer", "2",
       "--expansion", "4", "--k", "8", "--tokens", "640", "--batch-tokens", "64",
       "--buffer-tokens", "256", "--holdout", "0.25", "--top-n-features", "3",
       "--checkpoint-every", "4"]
SAME = dict(model=ModelSpec(name="tiny:llama", device="cpu"), layers=(1, 2), expansion=4, k=8,
            tokens=640, batch_tokens=64, buffer_tokens=256, holdout=0.25, top_n_features=3,
            checkpoint_every=4)

STEP_SCRIPT = '''
import json, sys
import torch
from mmie.core.distributed import ensure_group, world
from mmie.sae.modules import SaeConfig, build_sae
from mmie.train_sae.optim import Replica, make_optimizer, replica_step
from mmie.train_sae.parallel import plain_ddp, replicate
from mmie.sae.shard import split_batch

ensure_group()
ENGINES = {"accelerate": lambda sae, opt: replicate({0: sae}, {0: opt})[0],
           "ddp": lambda sae, opt: Replica(sae, *opt, module=plain_ddp(sae))}  # FSDP-config path
worst = {}
for arch, engine in [(a, e) for a in ("topk", "batchtopk", "matryoshka") for e in ENGINES]:
    cfg = SaeConfig(d_model=8, expansion=4, k=3, arch=arch, dead_after_tokens=1)
    x = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))  # 19 + 18 rows
    whole, ours = (build_sae(cfg, generator=torch.Generator().manual_seed(1)) for _ in "ab")
    for sae in (whole, ours):
        sae.tokens_since_fired[::3] = 5  # a third of the latents dead: AuxK runs
    out = whole(x)
    out.loss.backward()
    whole.remove_parallel_grad()
    whole.observe(out)
    rep = ENGINES[engine](ours, make_optimizer(ours, 1e-3))
    replica_step(rep, *split_batch(x, world()))  # the gradients stay after its update
    ref = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    grads = [float((p.grad - ref[n].grad).abs().max()) for n, p in ours.named_parameters()]
    buffers = [float((b - ref[n]).abs().sum()) for n, b in ours.named_buffers()]
    worst[f"{arch}/{engine}"] = max(grads + buffers)  # dead counters, BatchTopK threshold
if world().main:
    json.dump(worst, open(sys.argv[1], "w"))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"hi": write_jsonl(root / "hi.jsonl", HI), "en": write_jsonl(root / "en.jsonl", EN)}


def _launch(tmp_path: Path, *args: str) -> dict[int, str]:
    """Run ``args`` under ``torchrun --nproc_per_node 2``; each rank's stdout + stderr."""
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env = launch_env(TMPDIR=str(scratch))  # TMPDIR shows where temporary folders go
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--log-dir", str(logs), "--redirects", "3", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    printed = {rank: "".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_0/{rank}/*")))
               for rank in (0, 1)}
    assert done.returncode == 0, done.stderr[-3000:] + printed[0][-3000:] + printed[1][-3000:]
    return printed


def _max_diffs(one, two) -> tuple[float, float]:
    """Largest absolute difference over every SAE tensor, and over the training curve."""
    weights = max(float((one.tensors(f"layer{i}")[k] - t).abs().max())
                  for i in (1, 2) for k, t in two.tensors(f"layer{i}").items())
    curves = [[json.loads(row) for row in a.read_text("training_log.jsonl").splitlines()]
              for a in (one, two)]
    assert [(r["step"], r["layer"]) for r in curves[0]] == \
        [(r["step"], r["layer"]) for r in curves[1]]
    curve = max(abs(r[k] - s[k]) for r, s in zip(*curves, strict=True) for k in r)
    return weights, curve


def _cli(data, out: Path, *extra: str) -> list[str]:
    return ["-m", "mmie", "train-sae", *CLI, "--forget", str(data["hi"]), "--retain",
            str(data["en"]), "--out", str(out), *extra]


def test_two_processes_train_the_one_process_saes(data, tmp_path):
    one = run(TrainSaeConfig(forget=str(data["hi"]), retain=str(data["en"]), **SAME),
              tmp_path / "one" / "sae")
    runs = tmp_path / "two"
    printed = _launch(tmp_path, *_cli(data, runs / "sae"))
    two = load(runs / "sae", kind="sae")
    weights, curve = _max_diffs(one, two)
    assert weights < WEIGHTS and curve < CURVE, (weights, curve)
    for layer in ("1", "2"):
        assert two.metrics["layers"][layer]["fvu"] == pytest.approx(
            one.metrics["layers"][layer]["fvu"], abs=1e-5)
        assert two.metrics["selected"][layer] == one.metrics["selected"][layer]
    assert [p.name for p in runs.iterdir()] == ["sae"]  # one artifact, no checkpoint left
    assert not any((tmp_path / "scratch").iterdir())  # the shared activation folder is gone
    assert printed[1] == "" and "wrote" in printed[0]


def test_launched_resume_of_a_batchtopk_run_ends_where_one_process_does(data, tmp_path):
    config = TrainSaeConfig(forget=str(data["hi"]), retain=str(data["en"]), arch="batchtopk",
                            **SAME)
    one = run(config, tmp_path / "one" / "sae")
    out = tmp_path / "two" / "sae"
    with pytest.raises(KeyboardInterrupt):
        run(config, out, progress=StopAfter(6, "train SAEs"))
    assert (default_checkpoint_dir(out) / "state.pt").is_file()
    printed = _launch(tmp_path, *_cli(data, out, "--arch", "batchtopk", "--resume"))
    two = load(out, kind="sae")
    assert two.metrics["training"]["resumed_from_step"] == 4
    weights, curve = _max_diffs(one, two)
    assert weights < WEIGHTS and curve < CURVE, (weights, curve)
    assert not default_checkpoint_dir(out).exists() and printed[1] == ""


def test_a_sharded_step_has_the_whole_batch_gradients(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    _launch(tmp_path, str(script), str(tmp_path / "worst.json"))
    worst = json.loads((tmp_path / "worst.json").read_text())
    assert len(worst) == 6
    assert max(worst.values()) < GRADS, worst
