"""Versioned artifacts: a folder of safetensors files plus ``manifest.json``.

Every stage writes one through :func:`save` and reads its inputs through :func:`load`. A save
builds the whole folder under a temporary name beside the target and renames it into place, so
an interrupted run never leaves a half artifact. A load checks format, kind, schema version,
every file's sha256, every tensor's shape and dtype (read from the safetensors header, before
any tensor data), the manifest's own content hash, and the base model, and names the field,
expected and found value on refusal.

The content hash (``manifest_sha256``) covers every manifest field but ``created_at``, so an
edited config (say a relabelled objective) is refused; manifests written before it existed have
none and still load. Temp folders carry the writer's PID (``.NAME.tmp-PID-XXXX``), so one left
by a killed run is removed by the next save to that folder once that process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmie import __version__
from mmie.core import profile
from mmie.core.errors import ArtifactError, CorruptFileError

FORMAT = "mmie-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HASH_KEY = "manifest_sha256"
UNHASHED = ("created_at", HASH_KEY)  # a timestamp changes no meaning; the hash can't cover itself
KINDS = frozenset(
    {"layers", "sae", "adapter", "eval", "gate", "neurons", "activations", "scrub", "report",
     "comprehension", "relearn", "sweep", "langgate", "steering"}
)

# Named upgrade functions from an older schema version to the next; empty while only v1 exists.
UPGRADES: dict[int, Callable[[dict], dict]] = {}


@dataclass(frozen=True)
class ModelIdentity:
    """What a derived artifact needs to know about the base model it was made from."""

    name: str
    arch: str
    n_layers: int
    d_model: int
    vocab_size: int
    fingerprint: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelIdentity:
        known = {k: data[k] for k in ("name", "arch", "n_layers", "d_model", "vocab_size")}
        return cls(**known, fingerprint=dict(data.get("fingerprint", {})))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(path: Path) -> str:
    """Hash of an artifact's manifest; the manifest holds every file's sha256."""
    return sha256_file(Path(path) / MANIFEST)


@dataclass
class Artifact:
    """A verified artifact on disk. Tensors are read on demand."""

    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def model(self) -> ModelIdentity | None:
        data = self.manifest.get("model")
        return ModelIdentity.from_dict(data) if data else None

    def tensor_files(self) -> list[str]:
        return sorted(self.manifest["tensors"])

    def tensors(self, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if stem not in self.manifest["tensors"]:
            raise ArtifactError(f"{self.path}: no tensor file '{stem}.safetensors' "
                                f"(has: {', '.join(self.tensor_files()) or 'none'})")
        return load_file(str(self.path / f"{stem}.safetensors"), device=str(device))

    def read_text(self, relpath: str) -> str:
        return (self.path / relpath).read_text(encoding="utf-8")

    def read_jsonl(self, relpath: str) -> list[dict]:
        lines = self.read_text(relpath).splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def _tensor_meta(tensors: Mapping[str, torch.Tensor]) -> dict:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(tensors.items())}


@profile.phase("write")
def _write_files(tmp: Path, tensors, files, writer) -> dict:
    meta = {}
    for stem, group in tensors.items():
        contiguous = {k: v.detach().contiguous().cpu() for k, v in group.items()}
        save_file(contiguous, str(tmp / f"{stem}.safetensors"))
        meta[stem] = _tensor_meta(contiguous)
    for rel, payload in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(payload, bytes):
            target.write_bytes(payload)
        else:
            target.write_text(payload, encoding="utf-8")
    if writer is not None:
        writer(tmp)
    for extra in sorted(tmp.rglob("*.safetensors")):  # written by ``writer`` (PEFT's LoRA)
        stem = extra.relative_to(tmp).with_suffix("").as_posix()
        if stem not in meta:
            meta[stem] = {name: {"shape": v["shape"], "dtype": _ST_DTYPES.get(v["dtype"],
                                                                              v["dtype"])}
                          for name, v in sorted(safetensors_header(extra).items())}
    return meta


def _hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _parents(parents) -> list[dict]:
    out = []
    for parent in parents:
        parent = Path(parent)
        kind = json.loads((parent / MANIFEST).read_text())["kind"]
        out.append({"path": str(parent.resolve()), "kind": kind, "sha256": content_hash(parent)})
    return out


def check_names_a_folder(out: Path) -> None:
    """``--out ''`` arrives as ``.``: the current folder is never an artifact to write."""
    if str(out) in ("", ".") or out.resolve() == Path.cwd().resolve():
        raise ArtifactError(f"--out '{out}' names the current folder; give a new folder name")


def check_target(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse an ``out`` that names no folder, is a file or a foreign folder, or (without
    ``force`` or ``resume``) an existing artifact."""
    check_names_a_folder(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} is a file, not an artifact folder; refusing to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not an mmie artifact; refusing to replace it")
    if out.exists() and (out / MANIFEST).exists() and not (force or resume):
        raise ArtifactError(f"{out} already exists; pass --force to replace it")


_TEMP = r"\.(?:checkpoint\.)?(?:tmp|old)-(\d+)(?:-.*)?"
LEGACY_TEMP_AGE = 24 * 3600  # a temp folder without a PID counts as stale after a day


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # someone else's live process (or not a PID): keep its folder
    return True


def clean_stale(out: Path | str) -> list[Path]:
    """Remove temp and old folders beside ``out`` left by a killed run (its PID is gone)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{out.name}") + _TEMP + "$")
    legacy = re.compile(re.escape(f".{out.name}.tmp-") + r"[^-]+$")
    removed = []
    for child in out.parent.iterdir():
        match = pattern.match(child.name)
        stale = (match is not None and not pid_alive(int(match.group(1)))) or (
            match is None and legacy.match(child.name) is not None
            and time.time() - child.stat().st_mtime > LEGACY_TEMP_AGE)
        if stale and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _sealed(manifest: dict) -> dict:
    """``manifest`` plus its content hash, computed over its JSON round trip (what load sees)."""
    text = json.dumps(manifest, sort_keys=True, default=str, allow_nan=True)
    plain = json.loads(text)
    return {**manifest, HASH_KEY: sha256_json({k: v for k, v in plain.items()
                                               if k not in UNHASHED})}


def _check_seal(path: Path, manifest: dict) -> None:
    recorded = manifest.get(HASH_KEY)
    if recorded is None:
        return  # written before manifests were hashed: accepted as they are
    found = sha256_json({k: v for k, v in manifest.items() if k not in UNHASHED})
    if found != recorded:
        raise ArtifactError(f"{path / MANIFEST}: manifest was edited after it was written "
                            f"(content hash expected {recorded[:16]}..., found {found[:16]}...); "
                            "rerun the stage instead of editing the manifest")


def save(out: Path | str, kind: str, *, tensors: Mapping[str, Mapping[str, torch.Tensor]],
         config: Mapping[str, Any], model: ModelIdentity | None, parents=(),
         metrics: Mapping[str, Any] | None = None, files: Mapping[str, bytes | str] | None = None,
         writer: Callable[[Path], None] | None = None, force: bool = False) -> Artifact:
    """Write an artifact atomically and return it (see the module docstring)."""
    if kind not in KINDS:
        raise ArtifactError(f"unknown artifact kind '{kind}' (known: {', '.join(sorted(KINDS))})")
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    if (timed := profile.since_mark()) is not None:  # MMIE_PROFILE: this artifact's phases
        metrics = {**(metrics or {}), "profile": timed}
    try:
        meta = _write_files(tmp, tensors, files or {}, writer)
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind,
            "mmie_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dict(config), "model": model.to_dict() if model else None,
            "parents": _parents(parents), "tensors": meta, "files": _hash_tree(tmp),
            "metrics": dict(metrics or {}),
        }
        manifest = _sealed(manifest)
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str, allow_nan=True)
        (tmp / MANIFEST).write_text(text + "\n", encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        # Any failure, Ctrl-C included, must leave no temp folder behind; re-raised unchanged.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out, manifest)


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _refuse(path: Path, what: str, expected: Any, found: Any) -> ArtifactError:
    return ArtifactError(f"{path}: {what} mismatch: expected {expected!r}, found {found!r}")


def _read_manifest(path: Path) -> dict:
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path}: not an mmie artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path / MANIFEST}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise _refuse(path, "format", FORMAT, manifest.get("format"))
    return _upgrade(path, manifest)


def _upgrade(path: Path, manifest: dict) -> dict:
    version = manifest.get("schema_version")
    while isinstance(version, int) and version in UPGRADES:
        manifest = UPGRADES[version](manifest)
        version = manifest["schema_version"]
    if version != SCHEMA_VERSION:
        raise _refuse(path, "schema_version", SCHEMA_VERSION, version)
    return manifest


def safetensors_header(path: Path) -> dict:
    """Tensor names, shapes and dtypes from a safetensors header, without reading the data;
    ``ArtifactError`` naming the file when the header is truncated or malformed."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > os.path.getsize(path) - 8:
                raise ValueError(f"header of {size} bytes is longer than the file")
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        if not all(isinstance(v, dict) and {"shape", "dtype"} <= set(v) for v in header.values()):
            raise ValueError("an entry lacks 'shape' or 'dtype'")
    except (struct.error, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file (corrupt header: "
                            f"{exc})") from exc
    return header


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _check_files(path: Path, manifest: dict) -> None:
    recorded = manifest.get("files", {})
    present = {p.relative_to(path).as_posix() for p in path.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    if missing := sorted(set(recorded) - present):
        raise ArtifactError(f"{path}: missing files listed in the manifest: {', '.join(missing)}")
    if extra := sorted(present - set(recorded)):
        raise ArtifactError(f"{path}: unexpected files not in the manifest: {', '.join(extra)}")
    for rel, digest in recorded.items():
        found = sha256_file(path / rel)
        if found != digest:
            raise _refuse(path, f"sha256 of {rel}", digest, found)


def _check_tensors(path: Path, manifest: dict) -> None:
    for stem, expected in manifest.get("tensors", {}).items():
        header = safetensors_header(path / f"{stem}.safetensors")
        if set(header) != set(expected):
            raise _refuse(path, f"tensor names in {stem}.safetensors",
                          sorted(expected), sorted(header))
        for name, meta in expected.items():
            found = {"shape": header[name]["shape"],
                     "dtype": _ST_DTYPES.get(header[name]["dtype"], header[name]["dtype"])}
            if found != meta:
                raise _refuse(path, f"tensor {stem}/{name}", meta, found)


def check_model(path: Path, recorded: ModelIdentity | None, model: ModelIdentity) -> None:
    """Refuse an artifact made for another base model, naming what differs."""
    if recorded is None:
        raise ArtifactError(f"{path}: artifact records no base model; cannot check it against "
                            f"'{model.name}'")
    for key in ("n_layers", "d_model", "vocab_size"):
        if getattr(recorded, key) != getattr(model, key):
            raise _refuse(path, f"base model {key}", getattr(model, key), getattr(recorded, key))
    for key, value in model.fingerprint.items():
        if key in recorded.fingerprint and recorded.fingerprint[key] != value:
            raise ArtifactError(
                f"{path}: made for another base model: {key} expected {value[:16]}..., found "
                f"{str(recorded.fingerprint[key])[:16]}... (artifact model '{recorded.name}', "
                f"loaded model '{model.name}')")


def load(path: Path | str, kind: str | None = None, model: ModelIdentity | None = None,
         verify_hashes: bool = True) -> Artifact:
    """Open and verify an artifact; see the module docstring for what is checked."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact folder")
    manifest = _read_manifest(path)
    if kind is not None and manifest.get("kind") != kind:
        raise _refuse(path, "kind", kind, manifest.get("kind"))
    if verify_hashes:
        _check_files(path, manifest)
    _check_tensors(path, manifest)
    _check_seal(path, manifest)
    artifact = Artifact(path, manifest)
    if model is not None:
        check_model(path, artifact.model, model)
    return artifact


def iter_artifacts(root: Path, kind: str | None = None) -> Iterator[Artifact]:
    """Every artifact directly under ``root`` (for reports), verified."""
    for child in sorted(Path(root).iterdir()):
        if (child / MANIFEST).is_file():
            yield load(child, kind=kind)
