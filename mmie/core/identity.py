"""Where mmie keeps its files, and how a model's config is fingerprinted.

The lowest layer of model handling: ``tiny``, ``model_sources`` and ``models`` all build on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmie.core.artifacts import sha256_json

VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "quantization_config", "_attn_implementation_autoset",
                         "attn_implementation", "_attn_implementation",
                         "architectures"}  # save_pretrained fills it in


def mmie_home() -> Path:
    """``$MMIE_HOME``, else ``~/.cache/mmie``: converted models and file-hash caches live here."""
    return Path(os.environ.get("MMIE_HOME", Path.home() / ".cache" / "mmie"))


def config_hash(config) -> str:
    """sha256 of a transformers config, without the keys that change on save or load."""
    data = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return sha256_json(data)
