"""End to end: the Makefile pipeline (all five stages, gate and report) on a tiny model."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_pipeline_on_a_tiny_model(tmp_path):
    out = tmp_path / "run"
    cmd = ["make", "--no-print-directory", "pipeline", f"MMIE={sys.executable} -m mmie",
           "MODEL=tiny:llama", f"OUT={out}", "STEPS=3", "N_PROMPTS=4", "SAE_TOKENS=3000",
           "SL_OPTS=--max-samples 40", "SAE_OPTS=--expansion 2 --k 4 --max-heldout 8",
           "UNLEARN_OPTS=--max-length 192", "EVAL_OPTS=--max-new-tokens 8",
           "GATE_OPTS=--n-boot 200", "CONT_OPTS=--keep-all --max-new-tokens 8",
           "ARMS=glora-redirect lora-redirect lora-npo reft-graddiff reft-graddiff+sae-gate",
           "REDIRECT_OPTS=--objective-opt base=none", "GLORA_OPTS=--objective-opt base=none",
           "GATE_LAYERS=0 1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gate = json.loads((out / "gate" / "gate.json").read_text())
    assert set(gate["arms"]) == {"glora-redirect", "lora-redirect", "lora-npo", "reft-graddiff",
                                 "reft-graddiff+sae-gate"}
    assert all(v["decision"] in ("PROCEED", "STOP") for v in gate["arms"].values())
    page = (out / "report.html").read_text()
    assert "Gate decisions" in page and "data:image/png;base64," in page
    # a second run has nothing to do: every stage's artifact is up to date
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "mmie" not in again.stdout.replace("report:", "")
