"""ReFT interventions: identities at init, hand-set edits, orthonormality, gates, state dicts."""

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmie.edits.reft import (
    GatedIntervention,
    LoReFT,
    LowRankEdit,
    ReftConfig,
    build_intervention,
    gate_loss,
    gates,
    intervention_kinds,
    intervention_shapes,
)

D = 8
CONFIGS = [
    ReftConfig(kind=kind, rank=3, gate=gate, gate_hidden=5)
    for kind, gate in itertools.product(["lowrank", "loreft"], [None, "grun"])
]


@pytest.fixture
def hidden():
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))


def _basis_rows(rank, d=D):
    return torch.eye(d)[:rank].clone()


def test_registries():
    assert intervention_kinds() == ["loreft", "lowrank"]
    assert gates() == ["grun"]


def test_config_validation_names_valid_choices():
    with pytest.raises(ValueError, match="loreft, lowrank"):
        ReftConfig(kind="lora")
    with pytest.raises(ValueError, match="grun"):
        ReftConfig(gate="sae")
    for bad in [{"rank": 0}, {"gate_hidden": 0}, {"dropout": 1.0}, {"dropout": -0.1}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReftConfig(**bad)
    with pytest.raises(ValueError, match="d_model"):
        build_intervention(ReftConfig(rank=D + 1), D)
    with pytest.raises(ValueError, match="d_model"):
        intervention_shapes(ReftConfig(kind="loreft", rank=D + 1), D)


def test_fresh_lowrank_edit_is_exactly_identity(hidden):
    edit = build_intervention(ReftConfig(kind="lowrank", rank=3), D)
    assert isinstance(edit, LowRankEdit)
    assert torch.equal(edit(hidden), hidden)


def test_lowrank_edit_hand_set_weights(hidden):
    edit = LowRankEdit(D, rank=1)
    with torch.no_grad():
        edit.down.weight.copy_(_basis_rows(1))  # A reads coordinate 0
        edit.up.weight.zero_()
        edit.up.weight[1, 0] = 2.0  # B writes 2x it into coordinate 1
        edit.up.bias[2] = -1.0
    want = hidden.clone()
    want[..., 1] += 2 * hidden[..., 0]
    want[..., 2] -= 1.0
    torch.testing.assert_close(edit(hidden), want, rtol=0, atol=1e-6)


def test_fresh_loreft_is_identity(hidden):
    edit = build_intervention(ReftConfig(kind="loreft", rank=3), D)
    assert isinstance(edit, LoReFT)
    torch.testing.assert_close(edit.proj.weight, edit.rotation.detach())
    torch.testing.assert_close(edit(hidden), hidden, rtol=0, atol=1e-6)


def test_loreft_with_w_equal_r_and_zero_bias_is_identity(hidden):
    edit = LoReFT(D, rank=3)
    q, _ = torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        edit.rotate.weight = q.T.contiguous()
        edit.proj.weight.copy_(q.T)
        edit.proj.bias.zero_()
    torch.testing.assert_close(edit.rotation, q.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(edit(hidden), hidden, rtol=0, atol=1e-6)


def test_loreft_replaces_subspace_coordinates(hidden):
    """R = first two basis rows, W = 0, b = (5, -3): coordinates 0, 1 become 5, -3."""
    edit = LoReFT(D, rank=2)
    with torch.no_grad():
        edit.rotate.weight = _basis_rows(2)
        edit.proj.weight.zero_()
        edit.proj.bias.copy_(torch.tensor([5.0, -3.0]))
    want = hidden.clone()
    want[..., 0], want[..., 1] = 5.0, -3.0
    torch.testing.assert_close(edit(hidden), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.Adam(params, lr=0.1),
        # weight decay pulls the free tensor toward 0, which breaks torch's Householder map
        lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5),
        lambda params: torch.optim.SGD(params, lr=0.5),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_loreft_rotation_stays_orthonormal_under_training(hidden, make_optimizer):
    torch.manual_seed(0)
    edit = LoReFT(D, rank=3)
    before = edit.rotation.detach().clone()
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    opt = make_optimizer(edit.parameters())
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.mse_loss(edit(hidden), target).backward()
        opt.step()
    rotation = edit.rotation.detach()
    assert (rotation - before).abs().max() > 0.1  # it did move
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3), rtol=0, atol=1e-5)


def test_full_rank_loreft_builds_and_stays_orthogonal(hidden):
    edit = build_intervention(ReftConfig(kind="loreft", rank=D), D)
    torch.testing.assert_close(edit.rotation @ edit.rotation.T, torch.eye(D), rtol=0, atol=1e-5)


def test_gate_sigma_in_unit_interval(hidden):
    gated = build_intervention(ReftConfig(kind="lowrank", rank=2, gate="grun"), D)
    assert isinstance(gated, GatedIntervention)
    _, sigma = gated.forward_with_gate(hidden * 1e3)
    assert sigma.shape == hidden.shape[:-1]
    assert ((sigma >= 0) & (sigma <= 1)).all()


@pytest.mark.parametrize("kind", ["lowrank", "loreft"])
def test_gated_edit_with_closed_gate_is_identity_and_open_gate_is_the_edit(hidden, kind):
    gated = build_intervention(ReftConfig(kind=kind, rank=2, gate="grun"), D)
    with torch.no_grad():
        for p in gated.edit.parameters():  # a clearly non-identity edit
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        gated.gate.out.weight.zero_()
        gated.gate.out.bias.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly in fp32
    closed, sigma = gated.forward_with_gate(hidden)
    assert (sigma == 0).all()
    assert torch.equal(closed, hidden)
    with torch.no_grad():
        gated.gate.out.bias.fill_(1e4)
    torch.testing.assert_close(gated(hidden), gated.edit(hidden))
    assert not torch.allclose(gated.edit(hidden), hidden)


def test_gate_loss_hand_values_and_direction():
    half = torch.tensor([0.5, 0.5])
    assert gate_loss(half, half).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    forget = torch.tensor([0.9, 0.6], requires_grad=True)
    retain = torch.tensor([0.2], requires_grad=True)
    loss = gate_loss(forget, retain)
    by_hand = -(torch.log(torch.tensor(0.9)) + torch.log(torch.tensor(0.6))) / 2
    by_hand = by_hand - torch.log(torch.tensor(0.8))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert (forget.grad < 0).all() and (retain.grad > 0).all()
    with pytest.raises(ValueError, match="retain"):
        gate_loss(forget, torch.empty(0))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.gate}")
def test_intervention_shapes_match_state_dict(config):
    module = build_intervention(config, D)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == intervention_shapes(config, D)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.gate}")
def test_state_dict_round_trip_through_safetensors(config, hidden, tmp_path):
    torch.manual_seed(0)
    trained = build_intervention(config, D)
    with torch.no_grad():
        for p in trained.parameters():  # the rotation's factors too: R stays orthonormal
            p.add_(0.3 * torch.randn(p.shape))
    path = tmp_path / "edit.safetensors"
    save_file(trained.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_intervention(config, D)
    assert not torch.allclose(fresh(hidden), trained(hidden))
    fresh.load_state_dict(load_file(path))
    assert torch.equal(fresh(hidden), trained(hidden))
    saved = trained.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in fresh.state_dict().items())


def test_loading_a_bad_rotation_is_refused():
    edit = LoReFT(D, rank=3)
    state = edit.state_dict()
    skewed = dict(state, rotation=state["rotation"] * 2)
    with pytest.raises(RuntimeError, match="not orthonormal"):
        LoReFT(D, rank=3).load_state_dict(skewed)
    with pytest.raises(RuntimeError, match="expected shape"):
        LoReFT(D, rank=3).load_state_dict(dict(state, rotation=torch.zeros(2, D)))
    missing = {k: v for k, v in state.items() if k != "rotation"}
    with pytest.raises(RuntimeError, match="Missing key"):
        LoReFT(D, rank=3).load_state_dict(missing)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.gate}")
def test_bf16_hidden_states_keep_their_dtype(config, hidden):
    module = build_intervention(config, D)
    out = module(hidden.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape


def test_dropout_acts_only_in_training(hidden):
    edit = build_intervention(ReftConfig(rank=3, dropout=0.5), D)
    with torch.no_grad():
        edit.up.weight.fill_(1.0)
    edit.eval()
    assert torch.equal(edit(hidden), edit(hidden))
    edit.train()
    torch.manual_seed(0)
    assert not torch.equal(edit(hidden), edit.eval()(hidden))
