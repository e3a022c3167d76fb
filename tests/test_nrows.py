"""Neuron-row fine-tuning (``--method nrows``): zero deltas are the base model exactly, a row
delta moves the selected neurons only and by the hand-computed amount, the down delta adds
``z[S] @ D^T``, artifacts are checked on load, the CLI trains one from a mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load, save
from mmie.core.errors import ArtifactError
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import AdapterSpec, load_adapter
from mmie.edits.neurons import block_mlps, mask_tensors
from mmie.edits.nrows import NeuronRowsAdapter
from mmie.unlearn.config import UnlearnConfig
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import (
    one_thread,  # noqa: F401  (autouse: one torch thread)
    relearn_on,
)

runner = CliRunner()
TINY = ModelSpec(name="tiny:llama", device="cpu")
SELECTED = {1: [0, 5, 7], 2: [3]}


def _mask(lm, path: Path) -> Path:
    width = block_mlps(lm, [0])[0].down.weight.shape[1]
    masks = {i: torch.zeros(width, dtype=torch.bool) for i in range(lm.n_layers)}
    for i, idx in SELECTED.items():
        masks[i][idx] = True
    save(path, "neurons", tensors=mask_tensors(masks), config={"role": "mask"},
         model=lm.identity)
    return path


def _adapter(lm, tmp_path: Path) -> NeuronRowsAdapter:
    spec = AdapterSpec("nrows", layers=tuple(range(lm.n_layers)),
                       neurons=str(_mask(lm, tmp_path / "mask")))
    return NeuronRowsAdapter.create(lm, spec)


def _logits(lm, text: str = HI[0]) -> torch.Tensor:
    ids = lm.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def _capture(lm, module, text: str = HI[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module`` on one text."""
    got = {}
    handle = module.register_forward_hook(lambda m, a, o: got.update(x=a[0], y=o))
    try:
        _logits(lm, text)
    finally:
        handle.remove()
    return got["x"], got["y"]


def test_zero_deltas_are_the_base_model_exactly(tmp_path):
    with loaded(TINY) as lm:
        base = _logits(lm)
        adapter = _adapter(lm, tmp_path)
        assert sorted(adapter.index) == [1, 2] and adapter.index[1].tolist() == SELECTED[1]
        with adapter.edits():
            assert torch.equal(_logits(lm), base)
            with torch.no_grad():
                adapter.params["layer2.down_proj"].fill_(0.5)
            assert not torch.equal(_logits(lm), base)
        assert torch.equal(_logits(lm), base)  # the hooks left with the context


def test_row_delta_moves_the_selected_neurons_only_by_x_times_delta(tmp_path):
    with loaded(TINY) as lm:
        adapter = _adapter(lm, tmp_path)
        up = block_mlps(lm, [1])[1].rows["up_proj"]
        x, before = _capture(lm, up)
        delta = torch.randn(adapter.params["layer1.up_proj"].shape)
        with torch.no_grad():
            adapter.params["layer1.up_proj"].copy_(delta)
        with adapter.edits():
            _, after = _capture(lm, up)
        change = after - before
        others = [j for j in range(change.shape[-1]) if j not in SELECTED[1]]
        assert torch.equal(change[..., others], torch.zeros_like(change[..., others]))
        torch.testing.assert_close(change[..., SELECTED[1]], x @ delta.T)
        assert float((x @ delta.T).abs().max()) > 1e-2  # the check above could fail


def test_down_delta_adds_selected_activations_times_delta(tmp_path):
    with loaded(TINY) as lm:
        adapter = _adapter(lm, tmp_path)
        down = block_mlps(lm, [2])[2].down
        z, before = _capture(lm, down)
        delta = torch.randn(adapter.params["layer2.down_proj"].shape)
        with torch.no_grad():
            adapter.params["layer2.down_proj"].copy_(delta)
        with adapter.edits():
            _, after = _capture(lm, down)
        torch.testing.assert_close(after - before, z[..., SELECTED[2]] @ delta.T)


def _saved(lm, adapter, path: Path) -> Path:
    payload = adapter.payload()
    save(path, "adapter", tensors=payload.tensors, model=lm.identity,
         config={"adapter": adapter.spec.to_dict(), "method": "nrows", "objective": "test"})
    return path


def _tamper(path: Path, key: str, value: torch.Tensor) -> None:
    file = path / "rows.safetensors"
    tensors = load_file(file)
    tensors[key] = value
    save_file(tensors, file)


def test_artifact_round_trip_and_refusals(tmp_path):
    with loaded(TINY) as lm:
        made = _adapter(lm, tmp_path)
        with torch.no_grad():
            for p in made.params.values():
                p.normal_()
        got = load_adapter(_saved(lm, made, tmp_path / "ok"), lm)
        assert isinstance(got, NeuronRowsAdapter)
        assert all(torch.equal(made.params[k], got.params[k]) for k in made.params)
        assert not any(p.requires_grad for p in got.params.values())
        for name, key, value in (("range", "layer2.index", torch.tensor([10_000])),
                                 ("dup", "layer1.index", torch.tensor([0, 0, 7])),
                                 ("shape", "layer1.up_proj", torch.zeros(2, 2))):
            _saved(lm, made, tmp_path / name)
            _tamper(tmp_path / name, key, value)
            with pytest.raises(ArtifactError):
                load_adapter(tmp_path / name, lm)


def test_config_needs_a_mask_for_nrows_only():
    with pytest.raises(ValueError, match="--neurons"):
        UnlearnConfig(forget="hi.jsonl", retain=("en.jsonl",), method="nrows")
    with pytest.raises(ValueError, match="nrows only"):
        UnlearnConfig(forget="hi.jsonl", retain=("en.jsonl",), neurons="m")
    with pytest.raises(ValueError, match="nrows only"):
        AdapterSpec("lora", layers=(0,), neurons="m")


def test_cli_trains_an_nrows_arm_from_a_mask(tmp_path):
    with loaded(TINY) as lm:
        _mask(lm, tmp_path / "mask")
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:8]), write_jsonl(tmp_path / "en.jsonl", EN[:8])
    result = runner.invoke(app, [
        "unlearn", "--model", "tiny:llama", "--device", "cpu", "--method", "nrows",
        "--neurons", str(tmp_path / "mask"), "--objective", "redirect", "--objective-opt",
        "base=none", "--forget", str(hi), "--retain", str(en), "--steps", "2",
        "--max-length", "32", "--out", str(tmp_path / "arm")])
    assert result.exit_code == 0, result.output
    arm = load(tmp_path / "arm", kind="adapter")
    assert {p["kind"] for p in arm.manifest["parents"]} == {"neurons"}
    rows = arm.tensors("rows")
    assert rows["layer1.index"].tolist() == SELECTED[1]
    assert float(rows["layer1.up_proj"].abs().max()) > 0  # training moved the deltas


def test_relearn_keeps_an_nrows_arm_applied_during_the_attack(tmp_path):
    with loaded(TINY) as lm:
        made = _adapter(lm, tmp_path)
        with torch.no_grad():
            for p in made.params.values():
                p.normal_(0, 0.1)
        _saved(lm, made, tmp_path / "arm")
    result = relearn_on(tmp_path, tmp_path / "arm", HI)
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "r", kind="relearn")
    assert art.metrics["kept_during_attack"] == ["nrows"]
    assert art.config["applied"]["adapter"]["merged"] is False
