"""`unlearn` data-parallel: 2 CPU processes under torchrun (gloo) against 1 process, same global
batch.

Tolerances: float32 throughout. Two processes sum in another order than one (each process's
batch has its own padding width and matmul shapes, DDP adds the two halves' gradients, the
recorded losses are averaged over processes), so results agree to rounding, not bit for bit.
Measured max abs differences after 4 steps: 6e-7 on LoRA weights (magnitude 0.2), 2e-7 on the
gated ReFT weights (0.3), 4e-6 on recorded losses and gradient norms (relative <= 1.5e-5).
The bounds leave a margin of 7x or more over that and stay well below what a fault does
(measured on the gated ReFT run): a token mean taken per process instead of over the global
batch moves the weights by 4e-4 and the losses by 2e-3 relative; unsynchronised gradients move
the weights by 0.14.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mmie.core.artifacts import load
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import PEFT_WEIGHTS
from mmie.unlearn.stage import UnlearnConfig, checkpoint_dir, prepare, read_data, run
from mmie.unlearn.train import StepLoss, make_accelerator
from tests.conftest import EN, HI, REPO, write_jsonl
from tests.helpers import StopAfter, launch_env
from tests.test_unlearn import UR

WEIGHT_ATOL = 2e-5
CURVE_REL = 1e-4
LAUNCH_TIMEOUT = 240  # seconds; a hang (one process waiting for the other) fails, not blocks
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]




@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"hi": write_jsonl(root / "hi.jsonl", HI), "en": write_jsonl(root / "en.jsonl", EN),
            "ur": write_jsonl(root / "ur.jsonl", UR)}


# --- launching ---------------------------------------------------------------------------------

@dataclass
class Launch:
    returncode: int
    output: str            # torchrun's own output
    stdout: dict[int, str]  # per rank
    stderr: dict[int, str]


def launch(tmp_path: Path, args: list[str], name: str) -> Launch:
    """``torchrun --nproc_per_node 2 --standalone ARGS``, each rank's output in its own file."""
    logs = tmp_path / f"logs-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "--log-dir", str(logs), "--redirects", "3", *args]
    env = launch_env()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail(f"torchrun still running after {LAUNCH_TIMEOUT}s: a process is waiting")

    def read(rank: int, stream: str) -> str:
        found = sorted(logs.glob(f"*/attempt_0/{rank}/{stream}.log"))
        return found[-1].read_text() if found else ""

    return Launch(proc.returncode, output, {r: read(r, "stdout") for r in (0, 1)},
                  {r: read(r, "stderr") for r in (0, 1)})


def cli_args(files, *extra: str) -> list[str]:
    return ["-m", "mmie", "unlearn", "--model", "tiny:llama", "--device", "cpu",
            "--forget", str(files["hi"]), "--retain", str(files["en"]), "--steps", "4",
            "--batch-size", "4", "--max-length", "24", "--checkpoint-every", "2", *extra]


def config(files, **kw) -> UnlearnConfig:
    """The in-process twin of :func:`cli_args`: same settings, same global batch."""
    base = dict(forget=str(files["hi"]), retain=(str(files["en"]),),
                model=ModelSpec(name="tiny:llama", device="cpu"), steps=4, batch_size=4,
                max_length=24, checkpoint_every=2)
    return UnlearnConfig(**{**base, **kw})


# --- comparing ----------------------------------------------------------------------------------

def weights(path: Path) -> dict[str, torch.Tensor]:
    art = load(path, kind="adapter")
    return load_file(str(path / PEFT_WEIGHTS)) if art.config["method"] == "lora" \
        else art.tensors("reft")


def assert_same_run(one: Path, two: Path) -> None:
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    curve_a, curve_b = (load(p).metrics["curve"] for p in (one, two))
    assert len(curve_a) == len(curve_b)
    for ra, rb in zip(curve_a, curve_b, strict=True):
        assert ra.keys() == rb.keys()
        for key in sorted(set(ra) - {"seconds", "step"}):
            assert rb[key] == pytest.approx(ra[key], rel=CURVE_REL, abs=1e-6), (ra["step"], key)


# --- launched runs -------------------------------------------------------------------------------

def test_lora_npo_two_seeds_match_one_process_and_only_rank0_writes(files, tmp_path):
    out = tmp_path / "ddp"
    started = time.perf_counter()
    got = launch(tmp_path, [*cli_args(files, "--method", "lora", "--objective", "npo",
                                      "--rank", "4", "--lr", "1e-2", "--seed", "1",
                                      "--seed", "2", "--json", "--out", str(out))], "lora")
    assert got.returncode == 0, f"{got.output}\n{got.stderr}"
    assert time.perf_counter() - started < LAUNCH_TIMEOUT
    assert got.stdout[1] == "" and got.stderr[1] == ""  # rank 1 printed nothing at all
    summary = json.loads(got.stdout[0])
    assert [Path(s["path"]).name for s in summary] == ["seed1", "seed2"]
    # one artifact per seed and nothing else: no second writer's temp folder, no checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["seed1", "seed2"]
    for seed in (1, 2):
        art = load(out / f"seed{seed}", kind="adapter")
        assert art.metrics["processes"] == 2 and art.config["seed"] == seed
        one = run(config(files, method="lora", objective="npo", rank=4, lr=1e-2, seed=seed),
                  tmp_path / f"one{seed}")
        assert one.metrics["processes"] == 1
        assert_same_run(one.path, art.path)


def test_redirect_plus_npo_mixes_units_and_matches_one_process(files, tmp_path):
    """Redirect's NLL is a mean over alternative tokens, NPO's over sequences: each is scaled
    by its own unit's share, so two processes still train what one does. At 64 tokens the
    alternatives' lengths differ between the processes' shares."""
    opts = ("base=npo", "redirect_weight=0.5")
    got = launch(tmp_path, [*cli_args(files, "--objective", "redirect", "--alternative",
                                      str(files["en"]), "--rank", "4", "--lr", "1e-2",
                                      "--max-length", "64",
                                      *(x for o in opts for x in ("--objective-opt", o)),
                                      "--out", str(tmp_path / "ddp"))], "redirect")
    assert got.returncode == 0, f"{got.output}\n{got.stderr}"
    one = run(config(files, objective="redirect", alternative=str(files["en"]), rank=4, lr=1e-2,
                     max_length=64, objective_options=tuple(tuple(o.split("=")) for o in opts)),
              tmp_path / "one")
    assert load(tmp_path / "ddp").metrics["processes"] == 2
    assert_same_run(one.path, tmp_path / "ddp")


def test_gated_reft_resumes_under_the_launcher_from_a_one_process_checkpoint(files, tmp_path):
    """Steps 1-2 by one process, interrupted; steps 3-4 resumed by two: the same as one
    uninterrupted process (the gate's and the retain KL's token means span both shares)."""
    cfg = config(files, method="reft", objective="graddiff", gate="grun", lr=2e-2,
                 retain=(str(files["en"]), str(files["ur"])))
    whole = run(cfg, tmp_path / "whole")
    out = tmp_path / "ddp"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, progress=StopAfter(2))
    args = cli_args(files, "--retain", str(files["ur"]), "--method", "reft", "--objective",
                    "graddiff", "--gate", "grun", "--lr", "2e-2", "--resume", "--out", str(out))
    got = launch(tmp_path, args, "reft")
    assert got.returncode == 0, f"{got.output}\n{got.stderr}"
    assert got.stdout[1] == "" and got.stderr[1] == ""
    art = load(out, kind="adapter")
    assert art.metrics["resumed_from_step"] == 2 and art.metrics["processes"] == 2
    assert not checkpoint_dir(out).exists()
    assert_same_run(whole.path, out)


NAN_ON_RANK1 = """
import sys
from mmie.core.distributed import world
from mmie.core.models import ModelSpec
from mmie.unlearn.objectives import GradientAscent
from mmie.unlearn.stage import UnlearnConfig, run
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

original, calls = GradientAscent.forget_loss, []

def flaky(self, inputs):
    calls.append(1)
    value = original(self, inputs)
    return value * float("nan") if world().rank == 1 and len(calls) == 3 else value

GradientAscent.forget_loss = flaky
forget, retain, out = sys.argv[1:]
run(UnlearnConfig(forget=forget, retain=(retain,), model=ModelSpec(name="tiny:llama",
    device="cpu"), method="reft", objective="ga", steps=4, lr=1e-2, batch_size=2,
    max_length=24, checkpoint_every=2), out)
"""


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(files, tmp_path):
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK1)
    out = tmp_path / "nan"
    got = launch(tmp_path, [str(script), str(files["hi"]), str(files["en"]), str(out)], "nan")
    assert got.returncode != 0
    for rank in (0, 1):  # both stop at step 3, neither waits for the other
        assert "step 3: loss is not finite" in got.stderr[rank], got.stderr[rank]
    assert not out.exists()
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert state["step"] == 2


# --- in one process ------------------------------------------------------------------------------

def test_ddp_wraps_only_the_trainable_parameters(files):
    """DDP broadcasts and reduces what the wrapped module registers: the adapter, not the
    frozen model."""
    for method in ("lora", "reft"):
        cfg = config(files, method=method, objective="ga", steps=1)
        with loaded(cfg.model) as lm:
            prepared = prepare(cfg, lm, read_data(cfg))
            try:
                module = StepLoss(prepared.trainer)
                trainable = {id(p) for p in prepared.adapter.trainable().values()}
                assert {id(p) for p in module.parameters()} == trainable
                assert not list(module.buffers())
                assert any(not p.requires_grad for p in lm.model.parameters())  # still frozen
            finally:
                prepared.trainer.close()
                prepared.adapter.remove()


def test_batch_that_does_not_split_evenly_is_a_usage_error(files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mmie.cli import app

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="batch-size 4 does not split evenly over 3"):
        run(config(files, method="lora", objective="ga"), tmp_path / "o")
    result = CliRunner().invoke(app, [*cli_args(files)[2:], "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "multiple of 3" in " ".join(result.output.split())


def test_rank0_write_failure_reaches_the_other_ranks(tmp_path, monkeypatch):
    import mmie.core.distributed as unlearn
    from mmie.core.distributed import World
    from mmie.core.errors import MmieError

    def disk_full():
        raise OSError("disk full")

    monkeypatch.setattr(unlearn, "gather", lambda obj: ["OSError: disk full", obj])
    monkeypatch.setattr(unlearn, "world", lambda: World(1, 2, 1))
    with pytest.raises(MmieError, match="rank 0 failed to write .*: OSError: disk full"):
        unlearn.main_writes(disk_full, lambda: None, str(tmp_path / "a"))
    monkeypatch.setattr(unlearn, "world", lambda: World(0, 2, 0))
    with pytest.raises(OSError, match="disk full"):  # rank 0 re-raises its own error
        unlearn.main_writes(disk_full, lambda: None, str(tmp_path / "a"))


@pytest.mark.parametrize(("flag", "engine"), [("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"),
                                              ("ACCELERATE_USE_MEGATRON_LM", "MEGATRON_LM")])
def test_an_unsupported_sharded_accelerate_config_is_refused(flag, engine, monkeypatch):
    """Read from the launcher's flag: Accelerator() itself fails on a DeepSpeed config when
    deepspeed is not installed, and on CPU ignores sharded configs altogether."""
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ValueError, match=f"asks for {engine}, which mmie does not support"):
        make_accelerator()
