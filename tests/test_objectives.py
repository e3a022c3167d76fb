"""Unlearning objectives and retain losses on hand-made tensors (no models)."""

import math

import pytest
import torch

from mmie.core import kl_stats, losses
from mmie.unlearn.objectives import (
    Needs,
    ObjectiveInputs,
    RetainInputs,
    get_objective,
    get_retain_loss,
    objective_names,
    register_objective,
    retain_loss_names,
)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_registry_lists_all_objectives_and_retain_losses():
    assert objective_names() == ["dpo", "ga", "graddiff", "npo", "redirect", "rmu", "simnpo"]
    assert retain_loss_names() == ["kl", "nll"]


def test_unknown_names_and_options_list_the_valid_ones():
    with pytest.raises(ValueError, match="dpo, ga, graddiff, npo, redirect, rmu, simnpo"):
        get_objective("kto")
    with pytest.raises(ValueError, match="kl, nll"):
        get_retain_loss("mse")
    with pytest.raises(ValueError, match="no option gamma; options: beta, retain_weight"):
        get_objective("npo", gamma=1.0)
    with pytest.raises(ValueError, match=r"options: \(none\)"):
        get_objective("ga", beta=1.0)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_objective("npo")(type("Other", (), {}))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("npo", {"beta": 0.0}, "beta"),
        ("npo", {"beta": float("nan")}, "beta"),
        ("npo", {"retain_weight": -1.0}, "retain_weight"),
        ("graddiff", {"retain_weight": 0.0}, "retain_weight"),
        ("simnpo", {"gamma": -0.5}, "gamma"),
        ("rmu", {"steering_coeff": 0.0}, "steering_coeff"),
        ("rmu", {"layer": -1}, "layer"),
    ],
)
def test_configs_validate(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_objective(name, **options)


def test_needs_tell_the_loop_what_to_compute():
    assert get_objective("ga").needs == Needs(logprobs=True)
    assert get_objective("graddiff").needs == Needs(logprobs=True, retain_loss=True)
    assert get_objective("npo").needs.reference_logprobs
    assert not get_objective("npo", retain_weight=0.0).needs.retain_loss
    simnpo = get_objective("simnpo").needs
    assert simnpo.logprobs and not simnpo.reference_logprobs
    assert get_objective("rmu").needs == Needs(activations=True, reference_activations=True)


def test_ga_is_minus_token_mean_nll_and_pushes_likelihood_down():
    logp, n = _leaf([-10.0, -30.0]), torch.tensor([5.0, 10.0])
    loss = get_objective("ga").loss(ObjectiveInputs(logp=logp, n_tokens=n))
    assert loss.item() == pytest.approx(-40.0 / 15.0)
    loss.backward()
    # gradient descent moves logp against its gradient: positive gradient -> logp decreases
    assert (logp.grad > 0).all()
    torch.testing.assert_close(logp.grad, torch.full((2,), 1 / 15, dtype=torch.float64))


def test_graddiff_adds_weighted_retain_loss():
    inputs = ObjectiveInputs(
        logp=_leaf([-10.0]), n_tokens=torch.tensor([5.0]), retain_loss=torch.tensor(3.0)
    )
    loss = get_objective("graddiff", retain_weight=0.5).loss(inputs)
    assert loss.item() == pytest.approx(-2.0 + 1.5)
    with pytest.raises(ValueError, match="retain_loss"):
        get_objective("graddiff").loss(ObjectiveInputs(logp=_leaf([-1.0]), n_tokens=torch.ones(1)))


def test_npo_matches_hand_computed_value():
    logp, ref = _leaf([-10.0, -20.0]), torch.tensor([-12.0, -18.0], dtype=torch.float64)
    inputs = ObjectiveInputs(logp=logp, n_tokens=torch.tensor([4.0, 6.0]), ref_logp=ref)
    loss = get_objective("npo", beta=0.1, retain_weight=0.0).loss(inputs)
    # log ratios are +2 and -2; -(2 / 0.1) * logsigmoid(-0.1 * ratio), averaged
    by_hand = (-20 * _logsigmoid(-0.2) - 20 * _logsigmoid(0.2)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(
        (20 * math.log1p(math.exp(0.2)) + 20 * math.log1p(math.exp(-0.2))) / 2
    )
    loss.backward()
    # d/dlogp = 2 sigmoid(beta * ratio) / batch: the sequence above the reference gets more push
    want = [2 / (1 + math.exp(-0.2)) / 2, 2 / (1 + math.exp(0.2)) / 2]
    torch.testing.assert_close(logp.grad, torch.tensor(want, dtype=torch.float64))


def test_npo_approaches_ga_direction_as_beta_shrinks():
    logp_values, ref = [-10.0, -20.0, -15.0], torch.tensor([-12.0, -18.0, -30.0])
    n_tokens = torch.tensor([5.0, 5.0, 5.0])
    ga = _leaf(logp_values)
    get_objective("ga").loss(ObjectiveInputs(logp=ga, n_tokens=n_tokens)).backward()
    for beta, tol in [(1.0, None), (1e-4, 1e-3)]:
        npo = _leaf(logp_values)
        inputs = ObjectiveInputs(logp=npo, n_tokens=n_tokens, ref_logp=ref.double())
        get_objective("npo", beta=beta, retain_weight=0.0).loss(inputs).backward()
        assert (npo.grad > 0).all()  # same sign as GA at any beta
        cosine = torch.nn.functional.cosine_similarity(npo.grad, ga.grad, dim=0)
        if tol is not None:
            assert cosine.item() == pytest.approx(1.0, abs=tol)
            # equal lengths: NPO's sequence-sum gradient is GA's times mean length
            torch.testing.assert_close(npo.grad, ga.grad * 5.0, rtol=1e-3, atol=0)
        else:
            assert cosine.item() < 0.99  # at beta = 1 the weights differ visibly


def test_npo_requires_reference_logprobs():
    inputs = ObjectiveInputs(logp=_leaf([-1.0]), n_tokens=torch.ones(1))
    with pytest.raises(ValueError, match="ref_logp"):
        get_objective("npo").forget_loss(inputs)


def test_simnpo_matches_hand_computed_value():
    logp, n = _leaf([-8.0, -30.0]), torch.tensor([4.0, 10.0])
    inputs = ObjectiveInputs(logp=logp, n_tokens=n, retain_loss=torch.tensor(2.0))
    objective = get_objective("simnpo", beta=2.0, gamma=0.5, retain_weight=0.25)
    # per-token log-likelihoods -2 and -3: margin = -(2)(-2) - 0.5 = 3.5 and 5.5
    forget = (-1.0 * _logsigmoid(3.5) - 1.0 * _logsigmoid(5.5)) / 2
    assert objective.forget_loss(inputs).item() == pytest.approx(forget, rel=1e-12)
    assert objective.loss(inputs).item() == pytest.approx(forget + 0.5, rel=1e-12)
    objective.forget_loss(inputs).backward()
    assert (logp.grad > 0).all()


def test_forget_logprobs_are_checked():
    with pytest.raises(ValueError, match="at least one token"):
        get_objective("simnpo").loss(ObjectiveInputs(logp=_leaf([-1.0]), n_tokens=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"inputs.logp, inputs.n_tokens"):
        get_objective("ga").loss(ObjectiveInputs())


def test_rmu_zero_when_activations_hit_targets():
    rmu = get_objective("rmu", steering_coeff=3.0, alpha=10.0, seed=7)
    target = rmu.target(16)
    assert target.norm().item() == pytest.approx(3.0, rel=1e-6)
    assert torch.equal(target, get_objective("rmu", steering_coeff=3.0, seed=7).target(16))
    assert not torch.allclose(target, get_objective("rmu", steering_coeff=3.0, seed=8).target(16))
    retain = torch.randn(5, 16)
    inputs = ObjectiveInputs(
        activations=target.expand(4, 16).clone(),
        retain_activations=retain,
        ref_retain_activations=retain.clone(),
    )
    assert rmu.loss(inputs).item() == 0.0


def test_rmu_hand_computed_value():
    rmu = get_objective("rmu", steering_coeff=2.0, alpha=10.0)
    target = rmu.target(4)
    acts = target + torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # one element off by 1 of 4
    retain = torch.zeros(2, 4)
    ref = torch.zeros(2, 4)
    ref[0, 0] = 2.0  # one element off by 2 of 8
    inputs = ObjectiveInputs(
        activations=acts, retain_activations=retain, ref_retain_activations=ref
    )
    assert rmu.forget_loss(inputs).item() == pytest.approx(0.25)
    assert rmu.retain_term(inputs).item() == pytest.approx(10.0 * 4 / 8)
    with pytest.raises(ValueError, match="ref_retain_activations"):
        rmu.loss(ObjectiveInputs(activations=acts, retain_activations=retain))


def _retain_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 20, (2, 4), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    return hidden, weight, labels, mask


def test_nll_retain_is_token_mean_nll():
    hidden, weight, labels, mask = _retain_batch()
    inputs = RetainInputs(hidden=hidden, labels=labels, mask=mask, lm_head_weight=weight)
    got = get_retain_loss("nll", chunk_size=3)(inputs)
    logp = (hidden @ weight.T).log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    assert got.item() == pytest.approx(-(logp[mask]).mean().item(), rel=1e-12)


def test_kl_retain_topk_and_exact():
    hidden, weight, labels, mask = _retain_batch()
    ref_hidden = hidden + 0.3
    targets = losses.ref_topk(ref_hidden, weight, 20, mask)
    base = {"hidden": hidden, "labels": labels, "mask": mask, "lm_head_weight": weight}
    topk = get_retain_loss("kl")
    assert topk.needs_reference_targets and not topk.needs_reference_hidden
    exact = get_retain_loss("kl", exact=True)
    assert exact.needs_reference_hidden and not exact.needs_reference_targets
    approx = topk(RetainInputs(**base, ref_targets=targets))
    full = exact(RetainInputs(**base, ref_hidden=ref_hidden))
    assert full.item() > 0
    summary = kl_stats.ref_kl_stats(ref_hidden, weight, mask)  # the reference, computed once
    assert exact(RetainInputs(**base, ref_stats=summary)).item() == pytest.approx(
        full.item(), rel=1e-9)
    assert approx.item() == pytest.approx(full.item(), rel=1e-9)  # k = V: exact
    same = topk(RetainInputs(**{**base, "hidden": ref_hidden}, ref_targets=targets))
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="ref_targets"):
        topk(RetainInputs(**base))
    with pytest.raises(ValueError, match="top_k"):
        get_retain_loss("kl", top_k=0)


def test_kl_token_subsampling_scores_a_seeded_subset():
    import torch

    from mmie.unlearn.objectives import _subsample

    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    torch.manual_seed(0)
    a = _subsample(mask, 0.5)
    torch.manual_seed(0)
    b = _subsample(mask, 0.5)
    assert torch.equal(a, b)
    assert int(a.sum()) == 4 and not bool((a & ~mask).any())
    assert int(_subsample(mask, 0.01).sum()) == 1
    with pytest.raises(ValueError, match="token_frac"):
        get_retain_loss("kl", token_frac=0)
