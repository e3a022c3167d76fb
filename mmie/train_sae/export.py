"""Reading a trained ``sae`` artifact back as modules, and writing it in SAELens' layout.

:func:`load_sae` verifies the artifact (:func:`mmie.core.artifacts.load`: hashes, header shapes
against the manifest, base-model fingerprint when ``lm_identity`` is given), then compares the
recorded tensor shapes with those a shape-only (meta-device) skeleton of the recorded
:class:`~mmie.sae.modules.SaeConfig` has, so every tensor of every architecture is checked before
any real module is built, and loads with ``strict=True``.

:func:`export_saelens` writes one folder per layer, named after its hook
(``blocks.{i}.hook_resid_post``: TransformerLens' name for the output of block ``i``, which is
what mmie's layer ``i`` is), each with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, float32) and, when the artifact
has held-out firing frequencies, ``sparsity.safetensors`` (log10 frequency). ``cfg.json`` uses
the flat (pre-6) SAELens field names, which SAELens 5 reads directly and SAELens 6 converts
(``activation_fn_kwargs.k`` becomes ``k``; model and hook fields become metadata). TopK SAEs
export as ``topk``; BatchTopK and Matryoshka SAEs code at inference with one learned threshold,
i.e. a JumpReLU, so they export as ``jumprelu`` with that threshold for every latent. The HF
module path of the block (e.g. ``model.layers.5``) is recorded as ``hf_hook_name``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmie import __version__
from mmie.core.artifacts import Artifact, ModelIdentity, load
from mmie.core.errors import ArtifactError
from mmie.sae.modules import SAE_REGISTRY, SaeConfig, SparseAutoencoder, build_sae


def sae_config_of(artifact: Artifact) -> SaeConfig:
    recorded = artifact.config.get("sae")
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{artifact.path}: config has no 'sae' section")
    try:
        return SaeConfig(**recorded)
    except (TypeError, ValueError) as exc:  # unknown field / invalid value in the manifest
        raise ArtifactError(f"{artifact.path}: invalid SAE config in the manifest: {exc}") from exc


def expected_shapes(cfg: SaeConfig) -> dict[str, list[int]]:
    """Tensor shapes of an SAE with ``cfg``, from a meta-device skeleton (no memory, no data)."""
    with torch.device("meta"):
        skeleton = SAE_REGISTRY[cfg.arch](cfg)
    return {name: list(t.shape) for name, t in skeleton.state_dict().items()}


def sae_from_artifact(artifact: Artifact, layer: int,
                      device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE of ``layer`` in an already verified artifact, shapes checked before building."""
    cfg = sae_config_of(artifact)
    stem = f"layer{layer}"
    recorded = artifact.manifest.get("tensors", {}).get(stem)
    if recorded is None:
        raise ArtifactError(f"{artifact.path}: no SAE for layer {layer} (has layers "
                            f"{artifact.config.get('layers')})")
    found = {name: meta["shape"] for name, meta in recorded.items()}
    expected = expected_shapes(cfg)
    if found != expected:
        raise ArtifactError(f"{artifact.path}: tensors of {stem} do not fit the recorded SAE "
                            f"config: expected {expected}, found {found}")
    sae = build_sae(cfg, device=device)
    sae.load_state_dict(artifact.tensors(stem, device=device), strict=True)
    return sae.eval()


def load_sae(path: Path | str, layer: int, lm_identity: ModelIdentity | None = None,
             device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load the SAE of ``layer``; refuses an artifact made for another base model."""
    return sae_from_artifact(load(path, kind="sae", model=lm_identity), layer, device)


def load_saes(path: Path | str, lm_identity: ModelIdentity | None = None,
              device: str | torch.device = "cpu") -> dict[int, SparseAutoencoder]:
    artifact = load(path, kind="sae", model=lm_identity)
    return {int(i): sae_from_artifact(artifact, int(i), device) for i in artifact.config["layers"]}


# --------------------------------------------------------------------------- SAELens layout
def _topk(sae: SparseAutoencoder) -> tuple[dict, dict[str, torch.Tensor]]:
    k = sae.cfg.k
    return ({"architecture": "topk", "activation_fn_str": "topk", "activation_fn": "topk",
             "activation_fn_kwargs": {"k": k}, "k": k}, {})


def _jumprelu(sae: SparseAutoencoder) -> tuple[dict, dict[str, torch.Tensor]]:
    threshold = sae.threshold.detach().float().expand(sae.cfg.n_latents).clone()
    return ({"architecture": "jumprelu", "activation_fn_str": "relu", "activation_fn": "relu",
             "activation_fn_kwargs": {}}, {"threshold": threshold})


# SAELens architecture (and extra tensors) for each mmie architecture.
EXPORTERS: dict[str, Callable[[SparseAutoencoder], tuple[dict, dict[str, torch.Tensor]]]] = {
    "topk": _topk, "batchtopk": _jumprelu, "matryoshka": _jumprelu,
}


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def saelens_cfg(artifact: Artifact, sae: SparseAutoencoder, layer: int, arch_fields: dict) -> dict:
    config, model = artifact.config, artifact.model
    blocks = config.get("blocks_module")
    return {"d_in": sae.cfg.d_model, "d_sae": sae.cfg.n_latents, "dtype": "float32",
            "device": "cpu", "model_name": model.name if model else None,
            "hook_name": hook_name(layer), "hook_layer": layer, "hook_head_index": None,
            "hf_hook_name": f"{blocks}.{layer}" if blocks else None,
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "finetuning_scaling_factor": False, "reshape_activations": "none",
            "prepend_bos": True, "context_size": config.get("max_length"),
            "dataset_path": config.get("forget"), "sae_lens_training_version": None,
            "exported_by": f"mmie {__version__}", **arch_fields}


def _write_layer(folder: Path, artifact: Artifact, layer: int, features: dict) -> None:
    sae = sae_from_artifact(artifact, layer)
    if sae.cfg.arch not in EXPORTERS:
        raise ArtifactError(f"no SAELens export for SAE architecture '{sae.cfg.arch}'")
    arch_fields, extra = EXPORTERS[sae.cfg.arch](sae)
    weights = {name: sae.state_dict()[name].float().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder.mkdir(parents=True)
    save_file({**weights, **extra}, str(folder / "sae_weights.safetensors"))
    cfg = saelens_cfg(artifact, sae, layer, arch_fields)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    freq = features.get(f"L{layer}.freq_all")
    if freq is not None:
        save_file({"sparsity": torch.log10(freq.float() + 1e-10)},
                  str(folder / "sparsity.safetensors"))


def export_saelens(artifact: Artifact | Path | str, out_dir: Path | str, *,
                   force: bool = False) -> list[Path]:
    """Write every layer's SAE in SAELens' layout under ``out_dir``; returns the folders."""
    if not isinstance(artifact, Artifact):
        artifact = load(artifact, kind="sae")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    features = (artifact.tensors("features") if "features" in artifact.manifest["tensors"]
                else {})
    try:
        for layer in artifact.config["layers"]:
            _write_layer(tmp / hook_name(layer), artifact, int(layer), features)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half export; re-raised unchanged
        raise
    return [out_dir / hook_name(int(layer)) for layer in artifact.config["layers"]]
