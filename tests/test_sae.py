"""Sparse autoencoders: exact hand-set cases, sparse kernels vs dense maths, training."""

from __future__ import annotations

import pytest
import torch

from mmie.sae.kernels import SparseEncode, segment_sum
from mmie.sae.modules import (
    SAE_REGISTRY,
    SaeConfig,
    SparseAutoencoder,
    build_sae,
    geometric_median,
    register_sae,
)
from mmie.train_sae.optim import dense_topk_loss, make_optimizer, metrics, train_step
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

ARCHS = ("topk", "batchtopk", "matryoshka")




def identity_sae(arch: str = "topk", **overrides) -> SparseAutoencoder:
    """d=4, n=8: latent i reads +x_i, latent 4+i reads -x_i, so 4 latents rebuild any x."""
    cfg = SaeConfig(d_model=4, expansion=2, k=4, arch=arch, **overrides)
    sae = build_sae(cfg)
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
    return sae


def sparse_data(n_tokens: int, d: int = 16, n_features: int = 32, active: int = 3,
                seed: int = 0) -> torch.Tensor:
    """Tokens that are sums of a few positive multiples of fixed unit directions."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=1)
    picks = torch.rand(n_tokens, n_features, generator=gen).argsort(1)[:, :active]
    coefs = torch.rand(n_tokens, active, generator=gen) + 0.5
    code = torch.zeros(n_tokens, n_features).scatter_(1, picks, coefs)
    return code @ features + 0.3


def seeded_sae(seed: int = 0, **cfg) -> SparseAutoencoder:
    return build_sae(SaeConfig(**cfg), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_sae_reconstructs_exactly(arch):
    sae = identity_sae(arch)
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.3, 0.7, -0.2, 5.0]])
    out = sae(x)
    assert torch.allclose(out.recon, x, atol=1e-6)
    assert out.fvu.item() == pytest.approx(0.0, abs=1e-10)


def test_matryoshka_prefix_losses_hand_computed():
    sae = identity_sae("matryoshka", matryoshka_prefixes=(4, 8))
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-1.0, 2.0, -3.0, 4.0]])
    out = sae(x)
    # Prefix 4 holds only the "+x_i" latents: the negative coordinates (20 + 10) go missing
    # out of a total variance of 2 * (1 + 4 + 9 + 16) = 60.
    assert out.prefix_fvu.tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5, abs=1e-6)
    assert out.fvu.item() == pytest.approx(0.0, abs=1e-6)


def test_topk_fires_exactly_k_distinct_latents_per_token():
    sae = seeded_sae(d_model=16, expansion=4, k=5)
    vals, idx = sae.encode(torch.randn(3, 7, 16))
    assert vals.shape == idx.shape == (3, 7, 5)
    assert ((vals > 0).sum(-1) == 5).all()
    flat = idx.reshape(-1, 5)
    assert all(len(set(row.tolist())) == 5 for row in flat)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_and_dense_decode_agree(arch):
    sae = seeded_sae(d_model=16, expansion=4, k=6, arch=arch)
    with torch.no_grad():
        sae.b_dec.normal_()
    vals, idx = sae.encode(torch.randn(40, 16))
    z = torch.zeros(40, sae.cfg.n_latents).scatter_(1, idx, vals)
    assert torch.allclose(sae.decode_sparse(vals, idx), sae.decode_dense(z), atol=1e-5)


def test_gradients_match_naive_dense_topk():
    sae = seeded_sae(d_model=16, expansion=4, k=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(64, 16)
    sae(x).loss.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_topk_loss(sae, x).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name


def test_segment_sum_hand_computed():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    group, gather = torch.tensor([2, 0, 2, 0]), torch.tensor([0, 2, 1, 1])
    out = segment_sum(group, gather, torch.tensor([1.0, 2.0, 3.0, 4.0]), table, 4)
    assert out.tolist() == [[2.0, 6.0], [0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]


def test_sparse_encoder_passes_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, dtype=torch.double, generator=gen) + 1.0
    w_enc = (torch.rand(3, 6, dtype=torch.double, generator=gen) + 0.1).requires_grad_()
    b_enc = torch.zeros(6, dtype=torch.double, requires_grad=True)
    b_dec = torch.zeros(3, dtype=torch.double, requires_grad=True)
    tok, lat = torch.tensor([0, 0, 1, 3, 3, 2]), torch.tensor([1, 5, 1, 0, 2, 3])

    def gathered(x, b_dec, w_enc, b_enc):
        pre = torch.relu((x - b_dec) @ w_enc + b_enc).detach()
        return SparseEncode.apply(pre, tok, lat, x, b_dec, w_enc, b_enc)

    assert torch.autograd.gradcheck(gathered, (x, b_dec, w_enc, b_enc))  # b_dec via W_enc @ g
    assert torch.autograd.gradcheck(gathered, (x.requires_grad_(), b_dec, w_enc, b_enc))


def test_geometric_median_of_hand_made_points():
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    assert torch.allclose(geometric_median(line).float(), torch.tensor([2.0, 0.0]), atol=1e-4)
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(geometric_median(square).float(), torch.tensor([1.0, 1.0]), atol=1e-5)


@pytest.mark.parametrize(("init", "expected"), [("mean", [21.2, 0.0]),
                                                ("geometric_median", [2.0, 0.0])])
def test_init_b_dec_uses_configured_centre(init, expected):
    sae = build_sae(SaeConfig(d_model=2, expansion=2, k=1, decoder_init=init))
    sae.init_b_dec(torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]]))
    assert sae.b_dec.tolist() == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- batchtopk
def test_batchtopk_keeps_k_times_batch_in_training():
    sae = seeded_sae(d_model=16, expansion=4, k=3, arch="batchtopk")
    vals, idx = sae.train().encode(torch.randn(50, 16))
    per_token = (vals > 0).sum(-1)
    assert per_token.sum().item() == 3 * 50
    assert per_token.max() > 3 > per_token.min()  # the budget moves between tokens


def test_batchtopk_inference_keeps_everything_above_threshold():
    sae = seeded_sae(d_model=16, expansion=4, k=3, arch="batchtopk")
    sae.threshold.fill_(0.4)
    x = torch.randn(30, 16)
    vals, idx = sae.eval().encode(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected = pre * (pre > 0.4)
    got = torch.zeros_like(pre).scatter_(1, idx, vals)
    assert torch.allclose(got, expected.detach(), atol=1e-6)


def test_batchtopk_threshold_gives_about_k_at_inference():
    sae = seeded_sae(d_model=16, expansion=4, k=4, arch="batchtopk", threshold_decay=0.8)
    optimizer, _ = make_optimizer(sae, 3e-3)
    data = sparse_data(2048)
    for step in range(60):
        train_step(sae, optimizer, data[(step % 16) * 128:(step % 16 + 1) * 128])
    assert sae.threshold.item() > 0
    assert 2.0 < metrics(sae, data)["mean_l0"] < 8.0


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_sparse_data_reduces_fvu(arch):
    torch.manual_seed(0)
    sae = seeded_sae(d_model=16, expansion=4, k=4, arch=arch)
    data = sparse_data(1024)
    sae.init_b_dec(data[:256])
    before = metrics(sae, data)["fvu"]
    optimizer, scheduler = make_optimizer(sae, 5e-3, warmup_steps=5)
    for step in range(60):
        train_step(sae, optimizer, data[(step % 8) * 128:(step % 8 + 1) * 128],
                   scheduler=scheduler)
    after = metrics(sae, data)
    assert after["fvu"] < 0.5 * before
    assert after["explained_variance"] > 0.5


def test_decoder_rows_stay_unit_norm_and_parallel_grad_is_removed():
    sae = seeded_sae(d_model=16, expansion=4, k=4)
    optimizer, _ = make_optimizer(sae, 1e-2)
    for _ in range(5):
        train_step(sae, optimizer, torch.randn(64, 16))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    sae(torch.randn(64, 16)).loss.backward()
    sae.remove_parallel_grad()
    radial = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert radial.abs().max() < 1e-7
    assert sae.W_dec.grad.abs().max() > 0


def test_dead_latent_counters_follow_firing():
    sae = identity_sae(dead_after_tokens=4)
    sae.tokens_since_fired.fill_(3)
    sae.observe(sae(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, -1.0]])))
    # Latent 0 (+x_0) and latent 7 (-x_3) fired; every other latent aged by 2 tokens.
    assert sae.tokens_since_fired.tolist() == [0, 5, 5, 5, 5, 5, 5, 0]
    assert sae.dead_mask().tolist() == [False] + [True] * 6 + [False]


def _dead_fraction_after_training(auxk_coef: float) -> float:
    torch.manual_seed(0)
    sae = seeded_sae(d_model=16, expansion=4, k=4, auxk_coef=auxk_coef, auxk_k=16,
                     dead_after_tokens=128)
    with torch.no_grad():  # half the latents read x too weakly to ever win the top-k
        sae.W_enc[:, 32:] *= 0.05
        sae.tokens_since_fired[32:] = 128
    # 64 true features for 32 live latents: the residual has structure left to learn.
    data = sparse_data(1024, n_features=64)
    optimizer, _ = make_optimizer(sae, 5e-3)
    for step in range(60):
        stats = train_step(sae, optimizer, data[(step % 16) * 64:(step % 16 + 1) * 64])
    return stats["dead_fraction"]


def test_auxk_revives_dead_latents():
    without = _dead_fraction_after_training(0.0)
    with_auxk = _dead_fraction_after_training(1 / 32)
    assert without >= 0.45  # nothing but AuxK ever sends gradient to a latent that never fires
    assert with_auxk < without - 0.15


def test_bf16_autocast_step_is_finite():
    sae = seeded_sae(d_model=16, expansion=4, k=4, arch="matryoshka")
    optimizer, _ = make_optimizer(sae, 1e-3)
    stats = train_step(sae, optimizer, torch.randn(32, 16), autocast_dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert sae.W_enc.dtype == torch.float32


def test_warmup_scales_learning_rate_linearly():
    optimizer, scheduler = make_optimizer(seeded_sae(d_model=4, expansion=2, k=2), 1e-2, 4)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])


def test_metrics_of_identity_sae():
    sae = identity_sae()
    got = metrics(sae, torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.5, 0.0, 3.0, -1.0]]),
                  batch_size=1)
    assert got["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert got["explained_variance"] == pytest.approx(1.0)
    assert got["mean_l0"] == pytest.approx(2.5)
    assert got["dead_fraction"] == 0.0


# --------------------------------------------------------------------------- config / registry
def test_config_defaults_are_resolved():
    cfg = SaeConfig(d_model=64, arch="matryoshka")
    assert cfg.n_latents == 1024
    assert cfg.auxk_k == 32
    assert cfg.matryoshka_prefixes == (64, 128, 256, 512, 1024)
    assert SaeConfig(d_model=1, expansion=2, k=1).auxk_k == 1


@pytest.mark.parametrize("bad", [
    {"d_model": 0}, {"d_model": 8, "expansion": 0}, {"d_model": 8, "k": 0},
    {"d_model": 8, "expansion": 1, "k": 9}, {"d_model": 8, "arch": "jumprelu"},
    {"d_model": 8, "auxk_coef": -0.1}, {"d_model": 8, "auxk_k": 0},
    {"d_model": 8, "auxk_k": 10_000}, {"d_model": 8, "dead_after_tokens": 0},
    {"d_model": 8, "decoder_init": "median"}, {"d_model": 8, "threshold_decay": 1.0},
    {"d_model": 8, "matryoshka_prefixes": (8, 128)},
    {"d_model": 8, "expansion": 2, "arch": "matryoshka", "matryoshka_prefixes": (8, 4, 16)},
    {"d_model": 8, "expansion": 2, "arch": "matryoshka", "matryoshka_prefixes": (4, 8)},
    {"d_model": 8.0},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SaeConfig(**bad)


@pytest.mark.parametrize(("arch", "extra"), [("topk", set()), ("batchtopk", {"threshold"}),
                                             ("matryoshka", {"threshold"})])
def test_state_dict_uses_saelens_names_and_orientation(arch, extra):
    sae = seeded_sae(d_model=8, expansion=2, k=2, arch=arch)
    state = sae.state_dict()
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"} | extra
    assert state["W_enc"].shape == (8, 16) and state["W_dec"].shape == (16, 8)
    assert state["b_enc"].shape == (16,) and state["b_dec"].shape == (8,)
    clone = build_sae(sae.cfg)
    clone.load_state_dict(state, strict=True)
    x = torch.randn(5, 8)
    assert torch.equal(clone.eval().encode(x)[1], sae.eval().encode(x)[1])


def test_registry_refuses_duplicates_and_wrong_arch():
    assert set(ARCHS) <= set(SAE_REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        register_sae("topk")(SparseAutoencoder)
    with pytest.raises(ValueError, match="arch"):
        SAE_REGISTRY["batchtopk"](SaeConfig(d_model=4, k=2))


def test_forward_refuses_wrong_width_and_single_token():
    sae = seeded_sae(d_model=4, expansion=2, k=2)
    with pytest.raises(ValueError, match="last dimension"):
        sae(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2 tokens"):
        sae(torch.randn(1, 4))
