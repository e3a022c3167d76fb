"""interventions: SAE gate (exact identities), script scrub, adapters attached and removed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mmie.core.activations import harvest
from mmie.core.artifacts import content_hash, save
from mmie.core.hooks import capture_blocks
from mmie.core.models import ModelSpec, get_decoder, loaded
from mmie.edits.interventions import (
    ScrubConfig,
    attached,
    fit_scrub,
    sae_gate_fn,
    scrub_direction,
    scrub_fn,
)
from mmie.sae.modules import SaeConfig, build_sae
from mmie.unlearn.stage import UnlearnConfig, run
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

LLAMA = ModelSpec(name="tiny:llama", device="cpu")
# PEFT calls a transformers method deprecated in v5; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
IDS = torch.tensor([[1, 80, 81, 82, 83, 84, 85, 86]])




@pytest.fixture(scope="module")
def lm():
    with loaded(LLAMA) as handle:
        yield handle


def hidden(lm) -> torch.Tensor:
    with torch.no_grad():
        return get_decoder(lm.model)(input_ids=IDS).last_hidden_state


def assert_clean(lm, before: torch.Tensor) -> None:
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in lm.blocks)
    assert not any("lora" in name for name, _ in lm.model.named_modules())
    assert torch.equal(hidden(lm), before)


def hand_sae(b_dec=(0.0, 0.0, 0.0, 0.0)):
    """d = n = 4, identity encoder and decoder, TopK with k = 2."""
    sae = build_sae(SaeConfig(d_model=4, expansion=1, k=2)).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.tensor(b_dec))
    return sae


def test_sae_gate_hand_set_exact():
    h = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    sae = hand_sae(b_dec=(0.5, 0.0, 0.0, 0.0))  # codes: relu(h - b_dec) = [2.5, 1, 2, 0]
    assert torch.equal(sae_gate_fn(sae, [2], 1.0)(h), h)  # a = 1: exactly the identity
    # a = 0 removes z_2 d_2 = 2 e_2 and keeps the reconstruction error (h is not replaced by
    # the reconstruction [3, 0, 2, 0])
    assert torch.equal(sae_gate_fn(sae, [2], 0.0)(h), torch.tensor([[3.0, 1.0, 0.0, -1.0]]))
    assert torch.equal(sae_gate_fn(sae, [2], 0.5)(h), torch.tensor([[3.0, 1.0, 1.0, -1.0]]))
    assert torch.equal(sae_gate_fn(sae, [1], 0.0)(h), h)  # latent 1 is not in the top 2
    both = sae_gate_fn(sae, [0, 2], 0.0)(h)
    assert torch.equal(both, torch.tensor([[0.5, 1.0, 0.0, -1.0]]))


@pytest.fixture(scope="module")
def sae_artifact(lm, tmp_path_factory) -> tuple[Path, object, list[int]]:
    cfg = SaeConfig(d_model=32, expansion=2, k=4)
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(1)).eval()
    with capture_blocks(lm.blocks, [1]) as store, torch.no_grad():
        get_decoder(lm.model)(input_ids=IDS)
        _, idx = sae.encode(store[1])
    firing = sorted(set(idx.flatten().tolist()))[:3]
    out = tmp_path_factory.mktemp("sae") / "sae"
    save(out, "sae", tensors={"layer1": sae.state_dict()}, config={"sae": asdict(cfg),
         "layers": [1]}, model=lm.identity, metrics={"selected": {"1": firing}})
    return out, sae, firing


def test_sae_gate_attached_identity_at_one_and_removal_at_zero(lm, sae_artifact):
    path, sae, firing = sae_artifact
    before = hidden(lm)
    with attached(lm, sae=path, sae_gate_strength=1.0) as got:
        assert torch.equal(hidden(lm), before)
    assert got["arm"] == "base+sae-gate" and got["sae_gate"]["sha256"] == content_hash(path)
    with capture_blocks(lm.blocks, [1]) as store, torch.no_grad():
        get_decoder(lm.model)(input_ids=IDS)
    h = store[1]
    vals, idx = sae.encode(h)
    keep = torch.isin(idx, torch.tensor(firing))
    expected = h - ((vals * keep)[..., None] * sae.W_dec.detach()[idx]).sum(-2)
    with attached(lm, sae=path, sae_gate_strength=0.0), capture_blocks(lm.blocks, [1]) as s2:
        with torch.no_grad():
            get_decoder(lm.model)(input_ids=IDS)
        torch.testing.assert_close(s2[1], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(s2[1], h)
    assert_clean(lm, before)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    hi, en = write_jsonl(root / "hi.jsonl", HI), write_jsonl(root / "en.jsonl", EN)
    common = dict(forget=str(hi), retain=(str(en),), model=LLAMA, steps=1, lr=5e-2,
                  batch_size=2, max_length=16, checkpoint_every=0)
    return {m: run(UnlearnConfig(method=m, objective=o, **common), root / m).path
            for m, o in (("lora", "npo"), ("reft", "graddiff"))}


@pytest.fixture(scope="module")
def scrub_artifact(lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scrub") / "scrub"
    return fit_scrub(lm, HI, EN, [2], out, config=ScrubConfig(max_length=16)).path


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_everything_removed_after_an_exception(lm, adapters, sae_artifact, scrub_artifact,
                                               method):
    before = hidden(lm)
    with pytest.raises(RuntimeError, match="boom"):
        with attached(lm, adapter=adapters[method], sae=sae_artifact[0], scrub=scrub_artifact,
                      sae_gate_strength=0.0) as got:
            assert not torch.allclose(hidden(lm), before)
            assert got["arm"] == f"{got['adapter']['arm']}+sae-gate+scrub"
            assert got["adapter"]["sha256"] == content_hash(adapters[method])
            raise RuntimeError("boom")
    assert_clean(lm, before)


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_adapter_attached_changes_outputs_then_detaches(lm, adapters, method):
    before = hidden(lm)
    with attached(lm, adapter=adapters[method]) as got:
        assert not torch.allclose(hidden(lm), before)
    assert got["arm"] == {"lora": "lora-npo", "reft": "reft-graddiff"}[method]
    assert got["arm_parts"] == [got["arm"]]
    assert_clean(lm, before)


def test_scrub_direction_hand_made_2d():
    forget = torch.tensor([[2.0, 0.0], [2.0, 1.0]])
    retain = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    parts = scrub_direction(forget, retain, whiten=False, ridge=1e-2)
    assert torch.equal(parts["v"], torch.tensor([1.0, 0.0]))
    assert torch.equal(parts["mu"], torch.tensor([1.0, 0.5]))
    fn = scrub_fn(parts["v"], parts["w"], parts["mu"])
    assert torch.equal(fn(forget), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(fn(retain), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    white = scrub_direction(forget, retain, whiten=True, ridge=1e-2)
    assert float(white["w"] @ white["v"]) == pytest.approx(1.0)


@pytest.mark.parametrize("whiten", [False, True])
def test_scrub_removes_the_mean_difference_at_its_layer(lm, tmp_path, whiten):
    art = fit_scrub(lm, HI, EN, [1], tmp_path / "s", config=ScrubConfig(whiten=whiten,
                                                                         max_length=16))
    assert art.kind == "scrub" and art.config["whiten"] is whiten
    kw = dict(max_length=16, token_sample=4096, seed=0)
    gap = lambda: (harvest(lm, HI, [1], **kw).tokens[1].mean(0)  # noqa: E731
                   - harvest(lm, EN, [1], **kw).tokens[1].mean(0))
    before = gap()
    with attached(lm, scrub=art.path) as got:
        after = gap()
    assert got["scrub"]["whiten"] is whiten and got["arm"] == "base+scrub"
    assert float(after.norm()) < 1e-4 * float(before.norm())


def test_gate_strength_without_sae_is_refused(lm):
    with pytest.raises(ValueError, match="needs an SAE"):
        with attached(lm, sae_gate_strength=0.5):
            pass
