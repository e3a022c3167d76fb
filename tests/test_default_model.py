"""The real embedded model: slow (first use converts the GGUF), run by .ci/run."""

import pytest
import torch

from mmie.lid import detect
from mmie.models import ModelSpec, loaded

pytestmark = pytest.mark.slow


def test_default_model_continues_hindi_in_hindi():
    with loaded(ModelSpec(name="default", device="cpu")) as lm:
        assert lm.identity.n_layers == 18 and lm.identity.d_model == 640
        assert "gguf_sha256" in lm.identity.fingerprint
        enc = lm.tokenizer(["भारत की राजधानी नई दिल्ली एक बहुत"], return_tensors="pt")
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=24, do_sample=False)
        text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert detect([text])[0].lang == "hi", text
