import pytest
import torch
from torch import nn

from mmie.core.errors import ModelError
from mmie.core.hooks import capture_blocks, edit_blocks
from mmie.core.model_sources import resolve_source
from mmie.core.models import ModelSpec, get_decoder, load_model, loaded, resolve_blocks


def test_tiny_models_load_with_identity(tiny_lm, tiny_arch):
    ident = tiny_lm.identity
    assert ident.n_layers == 4 and ident.d_model == 32
    assert ident.name == f"tiny:{tiny_arch}"
    assert set(ident.fingerprint) == {"config_sha256", "weights_sha256"}
    assert tiny_lm.tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_tiny_fingerprint_is_stable():
    a = load_model(ModelSpec(name="tiny:llama")).identity
    b = load_model(ModelSpec(name="tiny:llama")).identity
    c = load_model(ModelSpec(name="tiny:qwen2")).identity
    assert a == b
    assert a.fingerprint["weights_sha256"] != c.fingerprint["weights_sha256"]


def test_tokenizer_round_trips_every_script(tiny_lm):
    for text in ["नमस्ते", "سلام", "ਸਤ ਸ੍ਰੀ ਅਕਾਲ", "নমস্কার", "hello"]:
        ids = tiny_lm.tokenizer(text)["input_ids"]
        assert tiny_lm.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unknown_layout_lists_candidates():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ModelError, match=r"stack \(3\).*--blocks-path"):
        resolve_blocks(Odd())
    assert len(resolve_blocks(Odd(), "stack")) == 3


@pytest.mark.parametrize("name,kind", [("tiny:llama", "tiny"), ("default", "default"),
                                       ("org/model", "hub")])
def test_resolve_source(name, kind):
    assert resolve_source(name).kind == kind


def test_bad_sources(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelError, match="unknown tiny model 'gpt9'"):
        load_model(ModelSpec(name="tiny:gpt9"))


def test_spec_validation():
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="int3")
    with pytest.raises(ValueError, match="device"):
        ModelSpec(device="tpu")


def test_folder_round_trip(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    with loaded(ModelSpec(name=str(tmp_path / "m"))) as again:
        fingerprint = tiny_lm.identity.fingerprint
        assert again.identity.fingerprint["config_sha256"] == fingerprint["config_sha256"]
        ids = tiny_lm.tokenizer(["hello there"], return_tensors="pt")
        assert torch.allclose(again.model(**ids).logits, tiny_lm.model(**ids).logits, atol=1e-6)


def test_capture_matches_hidden_states(tiny_lm):
    enc = tiny_lm.tokenizer(["a short text"], return_tensors="pt")
    full = tiny_lm.model(**enc, output_hidden_states=True).hidden_states
    with capture_blocks(tiny_lm.blocks, [0, 2]) as store:
        get_decoder(tiny_lm.model)(**enc)
    assert torch.allclose(store[0], full[1], atol=1e-6)
    assert torch.allclose(store[2], full[3], atol=1e-6)


def test_hooks_removed_after_exception(tiny_lm):
    enc = tiny_lm.tokenizer(["text"], return_tensors="pt")

    def explode(hidden):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with edit_blocks(tiny_lm.blocks, {1: explode}):
            tiny_lm.model(**enc)
    assert all(len(b._forward_hooks) == 0 for b in tiny_lm.blocks)


def test_edit_changes_output_and_identity_does_not(tiny_lm):
    enc = tiny_lm.tokenizer(["text"], return_tensors="pt")
    base = tiny_lm.model(**enc).logits
    with edit_blocks(tiny_lm.blocks, {1: lambda h: h}):
        same = tiny_lm.model(**enc).logits
    with edit_blocks(tiny_lm.blocks, {1: lambda h: h * 0}):
        zeroed = tiny_lm.model(**enc).logits
    assert torch.allclose(base, same) and not torch.allclose(base, zeroed)


def test_layer_out_of_range(tiny_lm):
    with pytest.raises(ValueError, match="out of range"):
        with capture_blocks(tiny_lm.blocks, [7]):
            pass


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot get 'someorg/none' from the model hub") as err:
        load_model(ModelSpec(name="someorg/none"))
    assert "\n" not in str(err.value)
