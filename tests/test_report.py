import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import save
from mmie.core.errors import ArtifactError
from mmie.report.stage import ReportConfig, run

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000100ffff03000006000557bfabd40000"
                    "000049454e44ae426082")


def _samples(forget_rate: float) -> str:
    recs = [{"set": "forget", "idx": i, "is_forget": int(i < forget_rate * 10), "is_own": None}
            for i in range(10)]
    recs += [{"set": "xlang:pa", "idx": i, "is_forget": 0, "is_own": 1} for i in range(10)]
    return "".join(json.dumps(r) + "\n" for r in recs)


def _run_folder(root):
    save(root / "layers", "layers", tensors={}, config={}, model=None,
         metrics={"chosen": [3, 5], "reasons": {"3": "highest probe AUC"}},
         files={"layers.png": PNG})
    save(root / "sae", "sae", tensors={}, config={}, model=None,
         metrics={"layers": {"3": {"fvu": 0.12, "mean_l0": 32.0}}, "selected": {"3": [7, 9]}})
    save(root / "lora", "adapter", tensors={}, config={"arm": "lora-npo", "seed": 1,
                                                       "method": "lora", "objective": "npo"},
         model=None, metrics={"curve": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)]})
    for arm, rate in (("base", 0.9), ("lora-npo", 0.1)):
        save(root / f"eval-{arm}", "eval", tensors={}, config={"arm": arm, "seed": 1},
             model=None, metrics={"forget_rate": {"value": rate, "n": 10}},
             files={"samples.jsonl": _samples(rate)})
    save(root / "gate", "gate", tensors={}, config={}, model=None,
         metrics={"lora-npo": {"value": 0, "decision": "STOP", "passed": 3,
                                       "failed": ["fluency", "mia_auc"]}},
         files={"gate.md": "| arm | gate | decision |\n|---|---|---|\n| lora-npo | ppl | FAIL |\n",
                "forest.png": PNG})


def test_report_is_self_contained(tmp_path):
    _run_folder(tmp_path / "run")
    out = run(ReportConfig((str(tmp_path / "run"),), str(tmp_path / "r.html")))
    page = out.read_text()
    for heading in ("Gate decisions", "Layer selection", "Sparse autoencoders",
                    "training curves", "cross-lingual"):
        assert heading in page
    assert page.count("data:image/png;base64,") >= 4  # layers, curves, heatmap, forest
    assert not re.search(r"(src|href)=[\"']?(https?:|/|\.\./)", page)
    assert "highest probe AUC" in page and "STOP" in page and "FAIL" in page
    assert "fluency, mia_auc" in page and "**" not in page


def test_report_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no mmie artifacts"):
        run(ReportConfig((str(tmp_path),), str(tmp_path / "r.html")))
    with pytest.raises(ValueError, match="html"):
        ReportConfig((str(tmp_path),), "r.pdf")


def test_report_cli(tmp_path):
    _run_folder(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_renders_in_chromium(tmp_path):
    _run_folder(tmp_path / "run")
    page = run(ReportConfig((str(tmp_path / "run"),), str(tmp_path / "r.html")))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", f"file://{page}"], check=True, timeout=120,
                   capture_output=True)
    assert shot.stat().st_size > 10_000
