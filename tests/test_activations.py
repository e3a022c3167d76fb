import torch

from mmie.core.activations import harvest
from tests.conftest import EN, HI


def test_pooled_matches_per_text_forward(tiny_lm):
    texts = HI[:3] + EN[:3]
    h = harvest(tiny_lm, texts, [1, 2], batch_size=4, token_sample=0)
    for i, text in enumerate(texts):
        enc = tiny_lm.tokenizer([text], return_tensors="pt")
        hs = tiny_lm.model(**enc, output_hidden_states=True).hidden_states
        expected = hs[2][0, 1:].mean(0)  # block 1 output, BOS left out
        assert torch.allclose(h.pooled[1][i], expected, atol=1e-4)
    assert h.n_tokens.tolist() == [len(tiny_lm.tokenizer(t)["input_ids"]) - 1 for t in texts]


def test_token_sample_bounded_and_seeded(tiny_lm):
    a = harvest(tiny_lm, HI + EN, [0, 3], batch_size=5, token_sample=50, seed=1)
    b = harvest(tiny_lm, HI + EN, [0, 3], batch_size=5, token_sample=50, seed=1)
    assert a.tokens[0].shape == (50, 32) and a.tokens[3].shape == (50, 32)
    assert torch.equal(a.tokens[3], b.tokens[3]) and torch.equal(a.token_text, b.token_text)


def test_order_independent_of_batch_size(tiny_lm):
    a = harvest(tiny_lm, HI + EN, [2], batch_size=1, token_sample=0)
    b = harvest(tiny_lm, HI + EN, [2], batch_size=7, token_sample=0)
    assert torch.allclose(a.pooled[2], b.pooled[2], atol=1e-4)
