import json
import re
import shutil
import subprocess

import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import save
from mmie.core.errors import ArtifactError
from mmie.core.plotting import fit_scale
from mmie.gate.render import _forest_panel
from mmie.report.stage import ReportConfig, run

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000100ffff03000006000557bfabd40000"
                    "000049454e44ae426082")
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", "--window-size=1280,800"]


def _samples(forget: list[str], pa_own: int) -> str:
    """forget: the language of each forget generation ('junk' = degenerate)."""
    recs = [{"set": "forget", "idx": i, "prompt": f"हिंदी वाक्य {i}", "generation": f"gen {i} {lab}",
             "lang": "und" if lab == "junk" else lab, "degenerate": int(lab == "junk"),
             "is_forget": int(lab == "hi"), "is_own": None} for i, lab in enumerate(forget)]
    recs += [{"set": "xlang:pa", "idx": i, "prompt": "ਪੰਜਾਬੀ", "generation": "ਹਾਂ", "lang": "pa",
              "degenerate": 0, "is_forget": 0, "is_own": int(i < pa_own)} for i in range(10)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


ARMS = {"base": (["hi"] * 9 + ["en"], 10, 10.0),
        "lora-npo": (["hi"] + ["en"] * 6 + ["junk"] * 3, 5, 12.0)}


def _gate(arm: str, name: str, decision: str, reason: str, insufficient: bool = False) -> dict:
    return {"arm": arm, "gate": name, "decision": decision, "reason": reason, "estimate": 0.1,
            "ci": {"low": 0.0, "high": 0.3}, "threshold": 0.05, "direction": "less", "n": 10,
            "min_n": 59, "q": None, "insufficient": insufficient, "report_only": False}


GATE_JSON = {
    "settings": {"alpha": 0.05, "n_boot": 200}, "rule": "PROCEED only when every gate passes.",
    "arms": {"lora-npo": {"decision": "STOP", "passed": 1, "n": 3,
                          "failed": ["fluency", "mia_auc"], "insufficient": ["forget_rate"],
                          "not_informative": ["romanized_forget"]}},
    "gates": [_gate("lora-npo", "forget_rate", "FAIL", "insufficient evidence: n=10, needs >= "
                    "59; upper bound 0.3 >= 0.05", insufficient=True),
              _gate("lora-npo", "romanized_forget", "NOT INFORMATIVE", "not informative: the "
                    "baseline's own rate on this family is 0.1 < floor 0.2"),
              _gate("lora-npo", "fluency", "REPORT", "reported only")]}


def _run_folder(root):
    save(root / "layers", "layers", tensors={}, config={}, model=None,
         metrics={"chosen": [3, 5], "reasons": {"3": "highest probe AUC"}},
         files={"layers.png": PNG})
    save(root / "sae", "sae", tensors={}, config={}, model=None,
         metrics={"layers": {"3": {"fvu": 0.12, "mean_l0": 32.0}}, "selected": {"3": [7, 9]}})
    save(root / "lora", "adapter", tensors={}, config={"arm": "lora-npo", "seed": 1,
                                                       "method": "lora", "objective": "npo"},
         model=None, metrics={"curve": [{"step": i, "loss": 10.0 ** i} for i in range(7)]})
    for arm, (forget, pa_own, ppl) in ARMS.items():
        save(root / f"eval-{arm}", "eval", tensors={},
             config={"arm": arm, "seed": 1, "forget_lang": "hi", "retain_lang": "en"},
             model=None, metrics={"forget_rate": {"value": 0.5, "n": 10},
                                  "retain_ppl": {"value": ppl, "n": 10}},
             files={"samples.jsonl": _samples(forget, pa_own)})
    save(root / "gate", "gate", tensors={}, config={}, model=None,
         metrics={"lora-npo": {"value": 0, "decision": "STOP", "passed": 1, "n": 3,
                               "failed": ["fluency", "mia_auc"]}},
         files={"gate.json": json.dumps(GATE_JSON), "forest.png": PNG})


def _answer(page: str) -> str:
    return page[page.index('<section id="answer">'):page.index("</section>")]


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


def test_report_opens_with_the_answer(tmp_path):
    _run_folder(tmp_path / "run")
    page = run(ReportConfig((str(tmp_path / "run"),), str(tmp_path / "r.html"))).read_text()
    answer = _answer(page)
    assert page.index("<section") < page.index("Gate decisions") < page.index(">Artifacts<")
    for header in ("Hindi rate on Hindi prompts", "Punjabi own rate", "English perplexity ratio",
                   "what replaced Hindi"):
        assert header in answer
    # base: 9 of 10 forget generations in Hindi; the arm: 1 of 10, Punjabi kept 5 of 10 (of 10)
    assert "0.90 (n=10)" in answer and "0.10 (n=10)" in answer
    assert "0.50 (n=10), kept 5 of 10" in answer and "1.2<" in answer  # 12 / 10
    assert "en 60% · degenerate 30% · hi 10%" in answer
    assert "insufficient evidence, too few samples to pass at this alpha: forget_rate " \
           "(n=10, needs &gt;= 59)" in answer
    assert "not informative" in answer and "romanized_forget" in answer
    # the side-by-side: prompt 1 with each arm's continuation (base, then the arm)
    row = page[page.index("हिंदी वाक्य 1"):]
    assert row.index("gen 1 hi") < row.index("gen 1 en") < row.index("हिंदी वाक्य 2")
    assert "(insufficient evidence)" in page and "NOT INFORMATIVE" in page


def test_scales_fit_the_data():
    def scale(values):
        ax = Figure().subplots()
        return fit_scale(ax, values), ax.get_yscale()

    assert scale([0.5, 0.9, 1.2]) == ("linear", "linear")
    assert scale([0.9, 1.1, 1e6]) == ("log", "log")
    assert scale([0.0, 0.9, 1e6]) == ("symlog", "symlog")
    ax = Figure().subplots()
    ax.plot([0, 1, 2], [0.0, 0.9, 1e6])
    fit_scale(ax, [0.0, 0.9, 1e6])
    assert ax.get_ylim()[0] == 0  # no decade of negatives below nonnegative data
    ax = Figure().subplots()
    rows = [{"arm": a, "gate": "retain_ppl_ratio", "estimate": e, "decision": "FAIL",
             "method": "bootstrap",
             "ci": {"low": e / 2, "high": e * 2}, "threshold": 1.05, "direction": "less"}
            for a, e in (("a", 1.01), ("b", 1e6))]
    _forest_panel(ax, rows, ["a", "b"])
    assert ax.get_xscale() == "log"


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


# Measures where the answer ends once laid out; appended to a copy of the page only.
PROBE = ("<script>const r = document.getElementById('answer').getBoundingClientRect();"
         "document.body.dataset.answerBottom = r.bottom;"
         "document.body.dataset.viewport = window.innerHeight;</script>")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_renders_in_chromium(tmp_path):
    _run_folder(tmp_path / "run")
    page = run(ReportConfig((str(tmp_path / "run"),), str(tmp_path / "r.html")))
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}",
                    f"file://{page}"], check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 10_000
    dom = subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom",
                          f"file://{probed}"], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    bottom = float(re.search(r'data-answer-bottom="([\d.]+)"', dom).group(1))
    viewport = float(re.search(r'data-viewport="([\d.]+)"', dom).group(1))
    assert 0 < bottom <= viewport, f"the answer ends at {bottom}px, below the first screen"
    assert "STOP" in _answer(dom) and "Hindi rate on Hindi prompts" in _answer(dom)


def test_answer_pools_seeds(tmp_path):
    _run_folder(tmp_path / "run")
    save(tmp_path / "run" / "eval-lora-npo-2", "eval", tensors={},
         config={"arm": "lora-npo", "seed": 2, "forget_lang": "hi", "retain_lang": "en"},
         model=None, metrics={"retain_ppl": {"value": 14.0, "n": 10}},
         files={"samples.jsonl": _samples(["en"] * 10, 10)})
    page = run(ReportConfig((str(tmp_path / "run"),), str(tmp_path / "r.html"))).read_text()
    answer = _answer(page)
    # seeds 1 and 2 pooled: 1 of 20 in Hindi, Punjabi 15 of 20 (base 10 of 10)
    assert "0.05 (n=20)" in answer and "0.75 (n=20), kept 15 of 20" in answer
    assert "1.3<" in answer  # mean of 12 / 10 and 14 / 10
