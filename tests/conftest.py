"""Shared fixtures: tiny models (built from config, random seeded weights) and small text files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmie.core.models import ModelSpec, loaded

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED = REPO.parent / "shared" / "data"

HI = ["मैं आज बाज़ार जा रहा हूँ", "यह किताब बहुत अच्छी है", "बारिश के बाद मौसम ठंडा हो गया",
      "हमारे गाँव में एक पुराना मंदिर है", "बच्चे मैदान में क्रिकेट खेल रहे हैं",
      "माँ ने आज स्वादिष्ट खाना बनाया", "रेलगाड़ी समय पर स्टेशन पहुँची",
      "उसने अपने दोस्त को पत्र लिखा", "दिल्ली में सर्दी बहुत पड़ती है",
      "किसान खेत में गेहूँ बो रहा है", "पुस्तकालय सुबह नौ बजे खुलता है",
      "हम कल पहाड़ों पर घूमने जाएँगे"]
EN = ["I am going to the market today", "This book is very good",
      "After the rain the weather became cold", "There is an old temple in our village",
      "The children are playing cricket in the field", "Mother cooked delicious food today",
      "The train reached the station on time", "He wrote a letter to his friend",
      "Delhi gets very cold in winter", "The farmer is sowing wheat in the field",
      "The library opens at nine in the morning", "Tomorrow we will go to the mountains"]


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    return path


@pytest.fixture
def text_files(tmp_path: Path) -> dict[str, Path]:
    return {"hi": write_jsonl(tmp_path / "hi.jsonl", HI),
            "en": write_jsonl(tmp_path / "en.jsonl", EN)}


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_lm(tiny_arch):
    with loaded(ModelSpec(name=f"tiny:{tiny_arch}", device="cpu")) as lm:
        yield lm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _no_reference_cache():
    # each test sees its own fresh computations; tests of the cache turn it on themselves
    import os

    before = os.environ.get("MMIE_CACHE")
    os.environ["MMIE_CACHE"] = "0"
    yield
    if before is None:
        os.environ.pop("MMIE_CACHE", None)
    else:
        os.environ["MMIE_CACHE"] = before


@pytest.fixture(autouse=True)
def _keep_threads():
    # a CLI invocation sets torch's thread count for the machine (mmie.core.threads)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
