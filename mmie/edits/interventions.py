"""Edits attached to a loaded model for evaluation: saved adapters, SAE feature gate, script scrub.

:func:`attached` applies any combination for the duration of a ``with`` block and removes all
of it on exit, also when the block raises: hooks through :func:`mmie.core.hooks.edit_blocks`, LoRA
layers through :meth:`mmie.edits.adapters.Adapter.remove` (``lm.model`` is the plain model again).

**SAE gate.** At each layer of an ``sae`` artifact, with z the SAE's latent code of the block
output h and d_i its decoder rows, ``h <- h - sum_{i in S} (1 - a) z_i d_i`` over the selected
forget features S (``metrics['selected']``). The SAE's reconstruction error is kept (h is edited,
not replaced by the reconstruction), so ``a = 1`` is exactly the identity and ``a = 0`` removes
those features' whole contribution. ``a`` defaults to 0.

**Script scrub.** Per layer, a rank-1 affine eraser ``h <- h - v (w . h - b)`` fitted on block
outputs of forget and retain tokens (:func:`fit_scrub`), with ``delta`` the difference of the
two class means and ``mu`` their midpoint (``b = w . mu``):

- plain: ``v = w = delta / |delta|``, the orthogonal projection removing the mean-difference
  direction around ``mu``;
- whitened (LEACE-style, Belrose et al. 2023, for a binary concept): ``v = delta``,
  ``w = S^-1 delta / (delta' S^-1 delta)`` with S the token covariance (plus a ridge); the
  least-squares-smallest change (in the Mahalanobis metric) that makes both class means equal,
  so directions that vary a lot anyway are disturbed less than with the plain projection.

Either way both class means map to ``mu``: no linear read-out of the mean difference is left.
Every position is edited, BOS included (the hook cannot tell which position is BOS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmie.core.activations import harvest
from mmie.core.artifacts import Artifact, content_hash, load, save
from mmie.core.errors import ArtifactError
from mmie.core.hooks import edit_blocks
from mmie.core.models import LoadedModel
from mmie.core.progress import SILENT, Progress
from mmie.edits.adapters import check_layers, check_names_shapes, load_adapter
from mmie.edits.neurons import neurons_attached
from mmie.sae.modules import SaeConfig, SparseAutoencoder, build_sae

# --- saved adapters ---------------------------------------------------------------------------

@contextmanager
def adapter_attached(lm: LoadedModel, path: Path) -> Iterator[dict]:
    adapter = load_adapter(path, lm)
    try:
        with adapter.edits():
            config = adapter.source.config
            yield {"path": str(path), "sha256": content_hash(path),
                   "method": config.get("method"), "objective": config.get("objective"),
                   "arm": f"{config.get('method')}-{config.get('objective')}"}
    finally:
        adapter.remove()


# --- SAE feature gate -------------------------------------------------------------------------

def _sae_config(artifact: Artifact) -> SaeConfig:
    raw = dict(artifact.config.get("sae") or {})
    if not raw:
        raise ArtifactError(f"{artifact.path}: sae artifact has no 'sae' config")
    if raw.get("matryoshka_prefixes") is not None:
        raw["matryoshka_prefixes"] = tuple(raw["matryoshka_prefixes"])
    try:
        return SaeConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{artifact.path}: invalid SAE config ({exc})") from exc


def load_saes(path: Path, lm: LoadedModel) -> tuple[Artifact, dict[int, tuple]]:
    """``{layer: (sae, selected feature ids)}`` from an ``sae`` artifact, shapes checked first."""
    artifact = load(path, kind="sae", model=lm.identity)
    cfg, selected = _sae_config(artifact), artifact.metrics.get("selected") or {}
    if not any(selected.values()):
        raise ArtifactError(f"{path}: no selected forget features (metrics['selected'])")
    check_layers(lm, [int(k) for k in selected])
    out = {}
    for key, ids in sorted(selected.items(), key=lambda kv: int(kv[0])):
        if not ids:
            continue
        layer, stem = int(key), f"layer{int(key)}"
        sae = build_sae(cfg, device=lm.block_device(layer)).eval()
        found = {k: tuple(v["shape"]) for k, v in artifact.manifest["tensors"].get(stem,
                                                                                   {}).items()}
        check_names_shapes(f"{path}/{stem}.safetensors", found,
                           {k: tuple(v.shape) for k, v in sae.state_dict().items()})
        sae.load_state_dict(artifact.tensors(stem), strict=True)
        if bad := [i for i in ids if not 0 <= int(i) < cfg.n_latents]:
            raise ArtifactError(f"{path}: layer {layer} selects latents {bad} outside "
                                f"0..{cfg.n_latents - 1}")
        out[layer] = (sae.requires_grad_(False), [int(i) for i in ids])
    return artifact, out


def sae_gate_fn(sae: SparseAutoencoder, features: Sequence[int], strength: float) -> Callable:
    """``h -> h - (1 - strength) * sum_{i in features} z_i(h) d_i`` (module docstring)."""
    ids = torch.tensor(sorted(set(features)), dtype=torch.long, device=sae.W_dec.device)
    column = torch.full((sae.cfg.n_latents,), -1, dtype=torch.long, device=ids.device)
    column[ids] = torch.arange(len(ids), device=ids.device)
    decoder, scale = sae.W_dec.detach()[ids], 1.0 - strength

    def gate(hidden: Tensor) -> Tensor:
        # the SAE stays where it was built; the edit goes back to wherever this hidden state is
        with torch.no_grad():
            vals, idx = sae.encode(hidden.to(sae.W_dec.device, sae.W_dec.dtype))
            pos = column[idx]
            coeff = torch.where(pos >= 0, vals, torch.zeros_like(vals)) * scale
            dense = coeff.new_zeros((*coeff.shape[:-1], len(ids)))
            dense.scatter_add_(-1, pos.clamp(min=0), coeff)
            removed = dense @ decoder
        return hidden - removed.to(hidden.device, hidden.dtype)

    return gate


@contextmanager
def sae_gate_attached(lm: LoadedModel, path: Path, strength: float | None) -> Iterator[dict]:
    a = 0.0 if strength is None else float(strength)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"SAE gate strength must be in [0, 1], got {a}")
    _, saes = load_saes(path, lm)
    fns = {layer: sae_gate_fn(sae, ids, a) for layer, (sae, ids) in saes.items()}
    with edit_blocks(lm.blocks, fns):
        yield {"path": str(path), "sha256": content_hash(path), "strength": a,
               "layers": sorted(saes), "n_features": {str(k): len(v[1]) for k, v in saes.items()},
               "arm": "sae-gate"}


# --- script scrub -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ScrubConfig:
    """How :func:`fit_scrub` estimates the erasers.

    whiten: LEACE-style oblique eraser (module docstring) instead of the orthogonal one.
    ridge: added to the covariance diagonal, as a share of its mean eigenvalue (whiten only).
    max_length, batch_size: tokens per text and texts per forward pass.
    token_sample: token states per set and layer used for the estimates.
    seed: seeds the token sample.
    """

    whiten: bool = False
    ridge: float = 1e-2
    max_length: int = 128
    batch_size: int = 8
    token_sample: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if min(self.max_length, self.batch_size, self.token_sample) < 1:
            raise ValueError("max_length, batch_size and token_sample must be >= 1")


def scrub_direction(forget: Tensor, retain: Tensor, whiten: bool,
                    ridge: float) -> dict[str, Tensor]:
    """``{'v', 'w', 'mu'}`` of the rank-1 eraser from token states ``[n, d]`` of each class."""
    forget, retain = forget.double(), retain.double()
    mu_f, mu_r = forget.mean(0), retain.mean(0)
    delta, mu = mu_f - mu_r, (mu_f + mu_r) / 2
    if float(delta.norm()) == 0.0:
        raise ArtifactError("forget and retain activations have identical means; "
                            "no direction to scrub")
    if not whiten:
        unit = delta / delta.norm()
        return {"v": unit.float(), "w": unit.float(), "mu": mu.float()}
    both = torch.cat([forget, retain])
    cov = torch.cov(both.T)
    cov += ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    solved = torch.linalg.solve(cov, delta)
    return {"v": delta.float(), "w": (solved / (delta @ solved)).float(), "mu": mu.float()}


def fit_scrub(lm: LoadedModel, forget_texts: Sequence[str], retain_texts: Sequence[str],
              layers: Sequence[int], out: Path | str, *, config: ScrubConfig = ScrubConfig(),
              force: bool = False, parents: Sequence[Path] = (),
              progress: Progress = SILENT) -> Artifact:
    """Estimate one eraser per layer from block outputs and save a ``scrub`` artifact."""
    layers = sorted({int(i) for i in layers})
    check_layers(lm, layers)
    kw = dict(max_length=config.max_length, batch_size=config.batch_size,
              token_sample=config.token_sample, seed=config.seed, progress=progress)
    got_f = harvest(lm, forget_texts, layers, desc="scrub forget", **kw)
    got_r = harvest(lm, retain_texts, layers, desc="scrub retain", **kw)
    tensors, stats = {}, {}
    for layer in layers:
        parts = scrub_direction(got_f.tokens[layer], got_r.tokens[layer], config.whiten,
                                config.ridge)
        tensors.update({f"layer{layer}.{k}": v for k, v in parts.items()})
        gap = got_f.tokens[layer].mean(0) - got_r.tokens[layer].mean(0)
        stats[str(layer)] = {"delta_norm": float(gap.norm()),
                             "n_forget_tokens": len(got_f.tokens[layer]),
                             "n_retain_tokens": len(got_r.tokens[layer])}
    settings = {**asdict(config), "layers": layers, "n_forget": len(forget_texts),
                "n_retain": len(retain_texts)}
    return save(out, "scrub", tensors={"scrub": tensors}, config=settings, model=lm.identity,
                parents=list(parents), metrics={"layers": stats}, force=force)


def scrub_fn(v: Tensor, w: Tensor, mu: Tensor) -> Callable:
    bias = float(w.double() @ mu.double())

    def scrub(hidden: Tensor) -> Tensor:
        # the vectors follow the hidden state (a no-op when already there): a hook never
        # relies on the device it was built for
        read = hidden.to(w.dtype) @ w.to(hidden.device) - bias
        return hidden - (read[..., None] * v.to(hidden.device)).to(hidden.dtype)

    return scrub


@contextmanager
def scrub_attached(lm: LoadedModel, path: Path) -> Iterator[dict]:
    artifact = load(path, kind="scrub", model=lm.identity)
    layers = [int(i) for i in artifact.config.get("layers", [])]
    check_layers(lm, layers)
    d = lm.identity.d_model
    found = {k: tuple(v["shape"]) for k, v in artifact.manifest["tensors"].get("scrub",
                                                                               {}).items()}
    check_names_shapes(f"{path}/scrub.safetensors", found,
                       {f"layer{i}.{k}": (d,) for i in layers for k in ("v", "w", "mu")})
    t = artifact.tensors("scrub")
    fns = {i: scrub_fn(*(t[f"layer{i}.{k}"].to(lm.block_device(i)) for k in ("v", "w", "mu")))
           for i in layers}
    with edit_blocks(lm.blocks, fns):
        yield {"path": str(path), "sha256": content_hash(path), "layers": layers,
               "whiten": bool(artifact.config.get("whiten")), "arm": "scrub"}


# --- all together -----------------------------------------------------------------------------

def _adapter_or_neurons(lm: LoadedModel, path: Path, neuron_scale: float | None):
    """An ``adapter`` artifact, or a ``neurons`` mask / ablation artifact scaling its neurons
    (:func:`mmie.edits.neurons.neurons_attached`): both are arms of their own."""
    if load(path).kind == "neurons":
        return neurons_attached(lm, path, neuron_scale)
    if neuron_scale is not None:
        raise ValueError(f"a neuron scale needs a neurons artifact; {path} is not one")
    return adapter_attached(lm, path)


@contextmanager
def attached(lm: LoadedModel, *, adapter: Path | None = None, sae: Path | None = None,
             sae_gate_strength: float | None = None, scrub: Path | None = None,
             neuron_scale: float | None = None) -> Iterator[dict]:
    """Apply the given edits (adapter first, then SAE gate, then scrub) for the block.

    ``adapter`` may also be a ``neurons`` mask or ablation artifact: its neurons are scaled
    by ``neuron_scale`` (default: the artifact's scale, 0 for a mask). Yields
    ``{'adapter': {...}, 'sae_gate': {...}, 'scrub': {...}, 'arm': str, 'arm_parts': [...]}``
    with only the applied keys; each record names the artifact path and content hash. ``arm``
    is ``<method>-<objective>``, ``neurons-x<scale>`` or ``base``, then ``+sae-gate``,
    ``+scrub``. Everything is removed on exit, also on an exception.
    """
    if sae_gate_strength is not None and sae is None:
        raise ValueError("an SAE gate strength needs an SAE artifact")
    if neuron_scale is not None and adapter is None:
        raise ValueError("a neuron scale needs a neurons artifact as the adapter")
    openers = (("adapter", adapter, lambda p: _adapter_or_neurons(lm, p, neuron_scale)),
               ("sae_gate", sae, lambda p: sae_gate_attached(lm, p, sae_gate_strength)),
               ("scrub", scrub, lambda p: scrub_attached(lm, p)))
    applied: dict = {}
    with ExitStack() as stack:
        for name, path, opener in openers:
            if path is not None:
                applied[name] = stack.enter_context(opener(Path(path)))
        parts = [r["arm"] for r in applied.values()]
        if adapter is None:
            parts.insert(0, "base")
        yield {**applied, "arm_parts": parts, "arm": "+".join(parts)}
