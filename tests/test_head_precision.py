"""bf16 LM head (mmie.core.head_precision) against fp32, on tiny models and a peaked head."""

from __future__ import annotations

import pytest
import torch

from mmie.core import head_precision as hp
from mmie.core import losses
from mmie.core.models import ModelSpec, get_decoder, loaded, unwrap


def _peaked(vocab=4096, d=64, n=48, seed=0):
    """A head whose rows put large, LM-like logits (max ~30) on a few ids."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=gen) * 0.25
    weight[:20, :4] += 2.0
    hidden = torch.randn(1, n, d, generator=gen)
    hidden[..., :4] *= 4
    labels = torch.randint(0, vocab, (1, n), generator=gen)
    labels[0, : n // 2] = (hidden[0, : n // 2] @ weight.T).argmax(-1)  # half: the top id
    return hidden, weight, labels


def test_fp32_context_changes_nothing():
    hidden, weight, labels = _peaked()
    plain = losses.token_logprobs(hidden, weight, labels, chunk_size=16)
    with hp.head_precision("fp32"):
        assert torch.equal(losses.token_logprobs(hidden, weight, labels, chunk_size=16), plain)


def test_bf16_logprobs_and_kl_stay_close_to_fp32():
    hidden, weight, labels = _peaked()
    assert (hidden[0] @ weight.T).max() > 20  # logits where bf16 rounding alone errs by 0.06
    exact = losses.token_logprobs(hidden, weight, labels, chunk_size=16)
    ref = losses.ref_topk(hidden, weight, k=8, chunk_size=16)
    student = hidden + 0.05 * torch.randn_like(hidden)
    kl = losses.topk_kl(student, weight, *ref, chunk_size=16)
    with hp.head_precision("bf16"):
        fast = losses.token_logprobs(hidden, weight, labels, chunk_size=16)
        fast_ref = losses.ref_topk(hidden, weight, k=8, chunk_size=16)
        fast_kl = losses.topk_kl(student, weight, *ref, chunk_size=16)
    assert (fast - exact).abs().max() < 5e-3
    assert (fast_ref[1] - ref[1]).abs().max() < 5e-3
    assert (fast_kl - kl).abs().max() < 2e-3
    assert (fast.sum() - exact.sum()).abs() < 0.02  # a sequence's total moves by little


def test_bf16_plain_rounding_would_be_worse():
    # the exact recomputation is what keeps the error small: without it the large logits
    # alone are off by up to half a bf16 step
    hidden, weight, labels = _peaked()
    exact = losses.token_logprobs(hidden, weight, labels, chunk_size=16)
    rough = losses.token_logprobs(hidden, weight.bfloat16(), labels, chunk_size=16)
    with hp.head_precision("bf16"):
        fast = losses.token_logprobs(hidden, weight, labels, chunk_size=16)
    assert (rough - exact).abs().max() > 4 * (fast - exact).abs().max()


def test_bf16_gradient_matches_fp32():
    hidden, weight, labels = _peaked()
    grads = []
    for name in ("fp32", "bf16"):
        h = hidden.clone().requires_grad_(True)
        with hp.head_precision(name):
            losses.token_logprobs(h, weight, labels, chunk_size=16).sum().backward()
        grads.append(h.grad.flatten())
    cos = torch.nn.functional.cosine_similarity(*grads, dim=0)
    assert cos > 0.999


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_on_tiny_models(arch):
    with loaded(ModelSpec(name=f"tiny:{arch}", device="cpu")) as lm:
        ids = torch.randint(3, lm.identity.vocab_size, (2, 12))
        hidden = get_decoder(lm.model)(input_ids=ids).last_hidden_state
        labels, mask = losses.shift_labels(ids)
        head = losses.head_params(unwrap(lm.model))
        exact = losses.token_logprobs(hidden, labels=labels, mask=mask, **head)
        with hp.head_precision("bf16"):
            fast = losses.token_logprobs(hidden, labels=labels, mask=mask, **head)
    assert (fast - exact).abs().max() < 5e-3


def test_weight_copy_cached_until_the_weight_changes():
    weight = torch.randn(64, 8)
    with hp.head_precision("bf16"):
        first = hp.fast_weight(weight)
        assert hp.fast_weight(weight) is first
        weight.add_(1.0)
        assert hp.fast_weight(weight) is not first
        assert hp.fast_weight(weight.double()) is None  # only an fp32 head is narrowed
    assert hp.fast_weight(weight) is None  # off outside the block
    with pytest.raises(ValueError, match="head dtype"), hp.head_precision("fp8"):
        pass


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_unlearn_with_bf16_head_follows_the_fp32_curve(tmp_path):
    from mmie.unlearn.stage import UnlearnConfig, run
    from tests.conftest import EN, HI, write_jsonl

    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:4]), write_jsonl(tmp_path / "en.jsonl", EN[:4])
    curves = {}
    for name in ("fp32", "bf16"):
        c = UnlearnConfig(forget=str(hi), retain=(str(en),), model=ModelSpec(
            name="tiny:gemma3", device="cpu"), steps=2, batch_size=2, max_length=16,
            checkpoint_every=0, head_dtype=name)
        art = run(c, tmp_path / name)
        assert art.config["head_dtype"] == name
        curves[name] = art.metrics["curve"]
    for a, b in zip(curves["fp32"], curves["bf16"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)
        assert b["forget_nll"] == pytest.approx(a["forget_nll"], abs=2e-3)
    with pytest.raises(ValueError, match="head dtype"):
        UnlearnConfig(forget=str(hi), retain=(str(en),), head_dtype="fp16")


def test_a_copy_first_made_in_inference_mode_still_trains():
    # unlearn's validation (inference mode) can be the first to ask for the bf16 copy; the
    # training step after it must still get a gradient through that copy
    from mmie.core.head_precision import fast_logits, fast_weight, head_precision
    weight = torch.randn(50, 8)
    with head_precision("bf16"):
        with torch.inference_mode():
            fast_weight(weight)
        h = torch.randn(3, 8, requires_grad=True)
        fast_logits(h, weight, fast_weight(weight), None).logsumexp(-1).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
