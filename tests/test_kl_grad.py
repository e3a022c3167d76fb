"""The closed-form exact KL (mmie.core.kl_grad) against autograd through the same logits."""

import pytest
import torch

from mmie.core import head_precision as hp
from mmie.core import losses
from mmie.core.kl_grad import full_kl_and_grad, label_logprob_and_grad

V, D, N = 300, 12, 9


def _inputs(dtype, bias: bool):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    ref = h + 0.3 * torch.randn(N, D, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    return h, ref, weight, b


def _autograd(h, ref, weight, bias, softcap):
    leaf = h.clone().requires_grad_(True)
    (value,) = losses._full_kl_chunk(leaf, ref, weight, bias, softcap=softcap)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_closed_form_equals_autograd_in_fp64(softcap, bias):
    h, ref, weight, b = _inputs(torch.float64, bias)
    value, grad = full_kl_and_grad(h, ref, weight, b, softcap)
    want_value, want_grad = _autograd(h, ref, weight, b, softcap)
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert (value > 0).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_closed_form_follows_the_head_precision(precision):
    h, ref, weight, _ = _inputs(torch.float32, False)
    with hp.head_precision(precision):
        value, grad = full_kl_and_grad(h, ref, weight, None, None)
        want_value, want_grad = _autograd(h, ref, weight, None, None)
    torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_full_kl_uses_the_closed_form_only_for_a_frozen_head(monkeypatch):
    h, ref, weight, _ = _inputs(torch.float64, False)
    calls = []
    real = losses.full_kl_and_grad
    monkeypatch.setattr(losses, "full_kl_and_grad",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    student = h.clone().requires_grad_(True)
    losses.full_kl(student[None], ref[None], weight, chunk_size=4).sum().backward()
    assert len(calls) == 3  # 9 tokens in chunks of 4
    trained = weight.clone().requires_grad_(True)
    losses.full_kl(h[None].requires_grad_(True), ref[None], trained, chunk_size=4).sum().backward()
    assert len(calls) == 3 and trained.grad is not None  # autograd for a trainable head
    want = _autograd(h, ref, weight, None, None)[1]
    torch.testing.assert_close(student.grad, want, rtol=1e-10, atol=1e-12)


def _autograd_logprob(h, labels, weight, bias, softcap):
    leaf = h.clone().requires_grad_(True)
    (value,) = losses._label_logprob_chunk(leaf, labels, weight, bias, softcap=softcap)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _labels(h, weight):
    # half the labels are each row's most likely id (among the exactly recomputed top ids)
    best = (h.float() @ weight.float().T).argmax(-1)
    other = torch.arange(len(h)) * 7 % V
    return torch.where(torch.arange(len(h)) % 2 == 0, best, other)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_label_logprob_closed_form_equals_autograd_in_fp64(softcap, bias):
    h, _, weight, b = _inputs(torch.float64, bias)
    labels = _labels(h, weight)
    value, grad = label_logprob_and_grad(h, labels, weight, b, softcap)
    want_value, want_grad = _autograd_logprob(h, labels, weight, b, softcap)
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_label_logprob_closed_form_follows_the_head_precision(precision):
    h, _, weight, _ = _inputs(torch.float32, False)
    labels = _labels(h, weight)  # labels among the exact top ids: each counted once
    with hp.head_precision(precision):
        value, grad = label_logprob_and_grad(h, labels, weight, None, None)
        want_value, want_grad = _autograd_logprob(h, labels, weight, None, None)
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)  # the same logits
    if precision == "fp32":
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
        return
    # both round the tail's probabilities to bf16 before the product (the closed form rounds
    # them unnormalised, exp(z - max z)): as far from the exact gradient, not bit-equal
    truth = _autograd_logprob(h.double(), labels, weight.double(), None, None)[1]
    err, err_autograd = ((g.double() - truth).abs().max() for g in (grad, want_grad))
    assert 0 < err <= 1.5 * err_autograd
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=2 * float(err_autograd))


def test_token_logprobs_take_the_closed_form(monkeypatch):
    h, _, weight, _ = _inputs(torch.float64, False)
    labels = _labels(h, weight)
    calls = []
    real = losses.label_logprob_and_grad
    monkeypatch.setattr(losses, "label_logprob_and_grad",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    student = h.clone().requires_grad_(True)
    losses.token_logprobs(student[None], weight, labels[None], chunk_size=5).sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(student.grad, _autograd_logprob(h, labels, weight, None, None)[1],
                               rtol=1e-10, atol=1e-12)
