import json
from pathlib import Path

import pytest
import torch

from mmie.core import artifacts
from mmie.core.artifacts import ModelIdentity, load, save
from mmie.core.errors import ArtifactError

IDENT = ModelIdentity("m", "Arch", 4, 8, 100,
                      {"config_sha256": "a" * 64, "weights_sha256": "b" * 64})


def _save(tmp_path: Path, **kw):
    tensors = {"w": {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                     "b": torch.ones(4, dtype=torch.float16)}}
    args = dict(tensors=tensors, config={"x": 1}, model=IDENT, metrics={"m": 0.5},
                files={"notes.md": "hello", "sub/data.jsonl": '{"a": 1}\n'})
    args.update(kw)
    return save(tmp_path / "art", "sae", **args)


def test_round_trip_identical_tensors(tmp_path):
    art = _save(tmp_path)
    back = load(art.path, kind="sae", model=IDENT)
    assert torch.equal(back.tensors("w")["a"], torch.arange(6.0).reshape(2, 3))
    assert back.tensors("w")["b"].dtype == torch.float16
    assert back.config == {"x": 1} and back.metrics == {"m": 0.5}
    assert back.model == IDENT
    assert back.read_jsonl("sub/data.jsonl") == [{"a": 1}]
    manifest = back.manifest
    assert manifest["format"] == artifacts.FORMAT
    assert manifest["schema_version"] == artifacts.SCHEMA_VERSION
    assert manifest["tensors"]["w"]["a"] == {"shape": [2, 3], "dtype": "float32"}
    assert set(manifest["files"]) == {"w.safetensors", "notes.md", "sub/data.jsonl"}


def test_no_temp_folders_left(tmp_path):
    _save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_refuses_overwrite_without_force(tmp_path):
    _save(tmp_path)
    with pytest.raises(ArtifactError, match="--force"):
        _save(tmp_path)
    _save(tmp_path, config={"x": 2}, force=True)
    assert load(tmp_path / "art").config == {"x": 2}


def test_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, writer=boom)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old(tmp_path):
    _save(tmp_path)

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _save(tmp_path, writer=boom, force=True)
    assert load(tmp_path / "art").config == {"x": 1}


def test_wrong_kind(tmp_path):
    art = _save(tmp_path)
    with pytest.raises(ArtifactError, match="kind mismatch: expected 'adapter', found 'sae'"):
        load(art.path, kind="adapter")


def test_wrong_schema_version(tmp_path):
    art = _save(tmp_path)
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema_version mismatch: expected 1, found 99"):
        load(art.path)


def test_corrupt_file_hash(tmp_path):
    art = _save(tmp_path)
    (art.path / "notes.md").write_text("tampered")
    with pytest.raises(ArtifactError, match="sha256 of notes.md"):
        load(art.path)


def test_wrong_shape_refused_before_reading(tmp_path):
    art = _save(tmp_path)
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["tensors"]["w"]["a"]["shape"] = [3, 2]
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"tensor w/a mismatch.*\[3, 2\].*\[2, 3\]"):
        load(art.path)


def test_missing_and_extra_files(tmp_path):
    art = _save(tmp_path)
    (art.path / "stray.txt").write_text("x")
    with pytest.raises(ArtifactError, match="unexpected files.*stray.txt"):
        load(art.path)
    (art.path / "stray.txt").unlink()
    (art.path / "notes.md").unlink()
    with pytest.raises(ArtifactError, match="missing files.*notes.md"):
        load(art.path)


def test_other_base_model_refused(tmp_path):
    art = _save(tmp_path)
    other = ModelIdentity("m2", "Arch", 4, 8, 100, {"config_sha256": "a" * 64,
                                                     "weights_sha256": "c" * 64})
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load(art.path, model=other)
    smaller = ModelIdentity("m", "Arch", 2, 8, 100, IDENT.fingerprint)
    with pytest.raises(ArtifactError, match="n_layers mismatch: expected 2, found 4"):
        load(art.path, model=smaller)


def test_parents_recorded_with_hash(tmp_path):
    parent = _save(tmp_path)
    child = save(tmp_path / "child", "eval", tensors={}, config={}, model=None,
                 parents=[parent.path])
    (record,) = child.manifest["parents"]
    assert record["kind"] == "sae"
    assert record["sha256"] == artifacts.content_hash(parent.path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        load(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="not an mmie artifact"):
        load(tmp_path / "plain")


def test_unknown_kind(tmp_path):
    with pytest.raises(ArtifactError, match="unknown artifact kind"):
        save(tmp_path / "x", "bogus", tensors={}, config={}, model=None)
