"""`unlearn --method lora` under an FSDP accelerate config: 2 CPU processes (gloo, FSDP2
``fully_shard``) against 1 process at the same global batch.

Tolerances: those of tests/test_unlearn_ddp.py. The sharded run reduces the same gradients in
the same order as DDP does: measured on tiny:llama (untied head, NPO + top-k KL, 4 steps) the
LoRA weights differ from 1 process by 5.7e-7 (magnitude 0.2) and the recorded losses by at
most 7e-6 relative; on tiny:gemma3 (tied head, GradDiff) FSDP and DDP gave bit-identical
weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from mmie.core.artifacts import load
from mmie.unlearn.fsdp import check
from mmie.unlearn.stage import run
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from tests.test_unlearn_ddp import assert_same_run, cli_args, config, launch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {"hi": write_jsonl(tmp_path / "hi.jsonl", HI),
            "en": write_jsonl(tmp_path / "en.jsonl", EN)}


def test_lora_under_fsdp_matches_one_process_and_saves_full_lora_weights(
        files, tmp_path, monkeypatch):
    settings = dict(method="lora", objective="npo", rank=4, lr=1e-2, seed=1, checkpoint_every=0)
    one = run(config(files, **settings), tmp_path / "one")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports
    out = tmp_path / "fsdp"
    got = launch(tmp_path, [*cli_args(files, "--method", "lora", "--objective", "npo",
                                      "--rank", "4", "--lr", "1e-2", "--seed", "1",
                                      "--checkpoint-every", "0", "--out", str(out))], "fsdp")
    assert got.returncode == 0, f"{got.output}\n{got.stderr}"
    art = load(out, kind="adapter")
    assert art.metrics["processes"] == 2 and art.metrics["fsdp"] is True
    assert one.metrics["fsdp"] is False
    assert_same_run(one.path, out)  # also: every LoRA tensor saved whole, with 1-process shapes


@pytest.mark.parametrize(("args", "message"), [
    (("reft", None, 0, False), "--method reft"),
    (("lora", 1, 0, False), "RMU"),
    (("lora", None, 10, False), "--checkpoint-every 0"),
    (("lora", None, 0, True), "--resume"),
])
def test_what_fsdp_does_not_do_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)
    check("lora", None, 0, False)
