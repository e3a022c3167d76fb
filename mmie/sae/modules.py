"""Sparse autoencoders (TopK, BatchTopK, Matryoshka) as plain torch modules.

Parameters use SAELens' orientation so artifacts and exports map one to one:
``W_enc [d_model, n_latents]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_model]`` with
unit-norm rows, ``b_dec [d_model]`` (plus a scalar ``threshold`` for BatchTopK / Matryoshka).

Training never builds the dense ``[tokens, n_latents]`` code. The encoder's dense matmul runs
without autograd and only picks latents; the picked activations, the decoder and every gradient
then touch only the ``tokens x k`` selected entries (:mod:`mmie.sae.kernels`).

``forward`` and ``observe`` take an optional :class:`~mmie.sae.shard.BatchShard`: under a
launcher a process holds only its rows of the batch, and the shard supplies what must come from
the whole batch (the FVU denominator, BatchTopK's cut, firing counts), so a data-parallel step
equals the single-process one. Optimisers, the training step and held-out metrics live in
:mod:`mmie.train_sae.optim`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmie.core.registry import Registry
from mmie.sae.kernels import SparseEncode, segment_sum, token_ids
from mmie.sae.shard import BatchShard

SAE_REGISTRY: Registry[type[SparseAutoencoder]] = Registry("SAE architecture", tag="arch")


@dataclass(frozen=True)
class SaeConfig:
    """Shape, sparsity and training knobs of one sparse autoencoder."""

    d_model: int
    """Width of the activations the SAE reads (the model's hidden size)."""
    expansion: int = 16
    """Latents per input dimension: ``n_latents = expansion * d_model``."""
    k: int = 32
    """Active latents per token (TopK) or per-token average over a batch (BatchTopK family)."""
    arch: str = "topk"
    """A registered architecture: ``topk``, ``batchtopk`` or ``matryoshka`` (BatchTopK coding)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that trains dead latents on the residual error; 0 disables it."""
    auxk_k: int | None = None
    """Dead latents AuxK may use per token. Default ``d_model // 2`` (Gao et al. 2024 use half
    the input width), at least 1 and at most ``n_latents``."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    matryoshka_prefixes: tuple[int, ...] | None = None
    """Increasing latent counts, ending at ``n_latents``, whose prefixes must each reconstruct
    (matryoshka only). Default: ``n_latents`` halved four times, ``(n/16, n/8, n/4, n/2, n)``."""
    decoder_init: str = "geometric_median"
    """How ``init_b_dec`` sets ``b_dec`` from a sample: ``mean`` or ``geometric_median``."""
    threshold_decay: float = 0.99
    """EMA decay of the BatchTopK inference threshold (running minimum kept activation)."""

    @property
    def n_latents(self) -> int:
        return self.expansion * self.d_model

    def __post_init__(self) -> None:
        for name in ("d_model", "expansion", "k", "dead_after_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SaeConfig.{name} must be a positive integer, got {value!r}")
        _check(self.k <= self.n_latents, f"k={self.k} exceeds n_latents={self.n_latents}")
        _check(self.arch in SAE_REGISTRY,
               f"unknown arch {self.arch!r}; have {sorted(SAE_REGISTRY)}")
        _check(self.decoder_init in B_DEC_INITS,
               f"unknown decoder_init {self.decoder_init!r}; have {sorted(B_DEC_INITS)}")
        _check(self.auxk_coef >= 0, f"auxk_coef must be >= 0, got {self.auxk_coef}")
        _check(0 <= self.threshold_decay < 1,
               f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        if self.auxk_k is None:
            object.__setattr__(self, "auxk_k", min(max(1, self.d_model // 2), self.n_latents))
        _check(0 < self.auxk_k <= self.n_latents,
               f"auxk_k must be in [1, n_latents={self.n_latents}], got {self.auxk_k}")
        self._resolve_prefixes()

    def _resolve_prefixes(self) -> None:
        if self.arch != "matryoshka":
            _check(self.matryoshka_prefixes is None, "matryoshka_prefixes needs arch='matryoshka'")
            return
        n = self.n_latents
        prefixes = self.matryoshka_prefixes
        if prefixes is None:
            prefixes = tuple(sorted({max(1, n >> shift) for shift in range(5)}))
        prefixes = tuple(prefixes)
        increasing = all(0 < a < b for a, b in zip(prefixes, prefixes[1:], strict=False))
        _check(bool(prefixes) and prefixes[0] > 0 and increasing and prefixes[-1] == n,
               f"matryoshka_prefixes must increase strictly and end at {n}, got {prefixes}")
        object.__setattr__(self, "matryoshka_prefixes", prefixes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def register_sae(name: str) -> Callable[[type[SparseAutoencoder]], type[SparseAutoencoder]]:
    """Class decorator: make an architecture available as ``SaeConfig(arch=name)``."""
    return SAE_REGISTRY.decorator(name)


def build_sae(cfg: SaeConfig, *, device: torch.device | str | None = None,
              generator: torch.Generator | None = None) -> SparseAutoencoder:
    """The registered module for ``cfg.arch``, freshly initialised (float32)."""
    return SAE_REGISTRY[cfg.arch](cfg, device=device, generator=generator)


def geometric_median(points: Tensor, *, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """Weiszfeld iterations for the point minimising the summed distance to ``points [m, d]``."""
    points = points.double()
    y = points.mean(0)
    for _ in range(iters):
        # Clamping keeps a weight finite when the estimate lands on a data point.
        w = 1.0 / (points - y).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * points).sum(0) / w.sum()
        done = float((new - y).norm()) <= tol * (1.0 + float(y.norm()))
        y = new
        if done:
            break
    return y


B_DEC_INITS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda points: points.double().mean(0),
    "geometric_median": geometric_median,
}


# --------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class SaeOutput:
    """One forward pass. ``vals``/``idx`` are ``[tokens, width]`` over flattened tokens."""

    recon: Tensor  # same shape as the input
    vals: Tensor  # kept activations; zeros pad BatchTopK rows that kept fewer than ``width``
    idx: Tensor  # latent of each entry of ``vals``
    fvu: Tensor  # scalar: fraction of variance unexplained by the full reconstruction
    prefix_fvu: Tensor  # [n_prefixes]: FVU of each nested prefix (one entry unless matryoshka)
    auxk_loss: Tensor  # dead latents' squared error on the residual / batch variance, or 0
    loss: Tensor  # prefix_fvu.sum() + auxk_coef * auxk_loss: what training minimises


class SparseAutoencoder(nn.Module):
    """Shared TopK-style SAE machinery; subclasses pick which latents fire (``_select``)."""

    arch: ClassVar[str] = ""

    def __init__(self, cfg: SaeConfig, *, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check(cfg.arch == self.arch, f"config arch {cfg.arch!r} given to {self.arch!r} SAE")
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_model
        rows = F.normalize(torch.randn(n, d, generator=generator), dim=1)
        # Tied initialisation (encoder = decoder transpose) starts every latent useful.
        self.W_enc = nn.Parameter(rows.t().contiguous().to(device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(rows.to(device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        # Not persistent: the saved state dict holds only the stable SAELens-style names.
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long,
                                                               device=device), persistent=False)
        self.prefixes: tuple[int, ...] = cfg.matryoshka_prefixes or (n,)
        self.register_buffer("_bounds", torch.tensor(self.prefixes[:-1], dtype=torch.long,
                                                     device=device), persistent=False)

    def _select(self, pre: Tensor, shard: BatchShard) -> tuple[Tensor, Tensor | None]:
        """Latents to fire from ReLU'd pre-activations: ``idx [tokens, width]``, keep mask."""
        raise NotImplementedError

    def _flat(self, x: Tensor) -> Tensor:
        _check(x.shape[-1] == self.cfg.d_model,
               f"expected last dimension {self.cfg.d_model}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.d_model).to(self.W_enc.dtype)

    @torch.no_grad()
    def _preacts(self, x2: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x2 - self.b_dec, self.W_enc).relu_()

    def _gather(self, pre: Tensor, x2: Tensor, idx: Tensor) -> Tensor:
        flat = SparseEncode.apply(pre, token_ids(idx).reshape(-1), idx.reshape(-1), x2,
                                   self.b_dec, self.W_enc, self.b_enc)
        return flat.view(idx.shape)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the firing latents, ``[..., width]`` each."""
        x2 = self._flat(x)
        pre = self._preacts(x2)
        idx, keep = self._select(pre, BatchShard.whole(x2))
        vals = self._gather(pre, x2, idx)
        if keep is not None:
            vals = vals * keep
        lead = x.shape[:-1]
        return vals.reshape(*lead, -1), idx.reshape(*lead, -1)

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """Reconstruction from ``encode``'s output, reading only the active decoder rows."""
        v2, i2 = vals.reshape(-1, vals.shape[-1]), idx.reshape(-1, idx.shape[-1])
        out = segment_sum(token_ids(i2).reshape(-1), i2.reshape(-1), v2.reshape(-1),
                           self.W_dec, i2.shape[0])
        return (out + self.b_dec).reshape(*vals.shape[:-1], self.cfg.d_model)

    def decode_dense(self, z: Tensor) -> Tensor:
        """Reconstruction from a dense code ``z [..., n_latents]``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, shard: BatchShard | None = None) -> SaeOutput:
        """Losses of the batch ``x``, or of this process's ``shard`` of a global batch."""
        x2 = self._flat(x)
        tokens = x2.shape[0]
        shard = shard or BatchShard.whole(x2)
        _check(shard.tokens >= 2, "an SAE batch needs at least 2 tokens to normalise the FVU")
        pre = self._preacts(x2)
        idx, keep = self._select(pre, shard)
        aux_idx = self._aux_select(pre)
        n_groups = len(self.prefixes)
        bags = torch.bucketize(idx, self._bounds, right=True) * tokens + token_ids(idx)
        vals = self._gather(pre, x2, idx)
        if keep is not None:
            vals = vals * keep
        flat = [(vals, idx, bags)]
        if aux_idx is not None:  # the residual fit rides in one extra bag group
            flat.append((self._gather(pre, x2, aux_idx), aux_idx,
                         n_groups * tokens + token_ids(aux_idx)))
        v, i, b = (torch.cat([part[j].reshape(-1) for part in flat]) for j in range(3))
        decoded = segment_sum(b, i, v, self.W_dec, (n_groups + 1) * tokens)
        decoded = decoded.view(n_groups + 1, tokens, -1)
        return self._losses(x, x2, decoded, vals, idx, aux_idx is not None, shard.total)

    def _losses(self, x: Tensor, x2: Tensor, decoded: Tensor, vals: Tensor, idx: Tensor,
                has_aux: bool, total: Tensor) -> SaeOutput:
        prefix_recon = decoded[:-1].cumsum(0) + self.b_dec  # latent groups are nested prefixes
        prefix_fvu = (x2 - prefix_recon).pow(2).sum((1, 2)) / total
        recon = prefix_recon[-1]
        auxk = x2.new_zeros(())
        if has_aux:
            auxk = ((x2 - recon).detach() - decoded[-1]).pow(2).sum() / total
        loss = prefix_fvu.sum() + self.cfg.auxk_coef * auxk
        return SaeOutput(recon.view(x.shape), vals, idx, prefix_fvu[-1], prefix_fvu, auxk, loss)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in ``cfg.dead_after_tokens`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def _aux_select(self, pre: Tensor) -> Tensor | None:
        if not self.training or self.cfg.auxk_coef == 0:
            return None
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        return (pre * dead).topk(min(self.cfg.auxk_k, n_dead), dim=1, sorted=False).indices

    @torch.no_grad()
    def observe(self, out: SaeOutput, shard: BatchShard | None = None) -> None:
        """Update training statistics (dead-latent counters) after a training step.

        With a ``shard`` the counts cover the whole batch, so every process keeps equal counters.
        """
        fired = torch.zeros_like(self.tokens_since_fired).index_add_(
            0, out.idx.reshape(-1), (out.vals > 0).reshape(-1).long())
        tokens = out.idx.shape[0]
        if shard is not None:
            fired, tokens = shard.sum_(fired), shard.tokens
        self.tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Re-project decoder rows onto the unit sphere."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient along each decoder row, so a step only rotates the row."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(1e-12)
        g.addcmul_(w, coef[:, None], value=-1.0)  # in place: no [n_latents, d] temporaries

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor) -> None:
        """Set ``b_dec`` to the ``cfg.decoder_init`` centre of ``sample [..., d_model]``."""
        centre = B_DEC_INITS[self.cfg.decoder_init](self._flat(sample))
        self.b_dec.copy_(centre.to(self.b_dec.dtype))


@register_sae("topk")
class TopKSae(SparseAutoencoder):
    """Exactly ``k`` latents per token (Gao et al. 2024)."""

    def _select(self, pre: Tensor, shard: BatchShard) -> tuple[Tensor, Tensor | None]:
        return pre.topk(self.cfg.k, dim=1, sorted=False).indices, None


@register_sae("batchtopk")
class BatchTopKSae(SparseAutoencoder):
    """Top ``k * tokens`` activations across the batch in training; a fixed threshold after.

    The threshold is an EMA of the smallest activation each training batch kept, so inference
    keeps about ``k`` latents per token on average without needing a batch.
    """

    def __init__(self, cfg: SaeConfig, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.register_buffer("threshold", torch.zeros((), device=self.W_enc.device))

    def _select(self, pre: Tensor, shard: BatchShard) -> tuple[Tensor, Tensor | None]:
        width = min(4 * self.cfg.k, pre.shape[1])
        while True:
            # Only the per-row top ``width`` are candidates; widen while a row might hold more.
            # Every process widens together (``any_``), as one process would for the whole batch.
            cand, idx = pre.topk(width, dim=1)
            if self.training:
                keep_n = min(self.cfg.k, width) * shard.tokens
                cut = shard.kth_largest(cand.flatten(), keep_n)
                keep = (cand >= cut) & (cand > 0)
            else:
                cut = self.threshold
                keep = cand > cut
            if width == pre.shape[1] or not shard.any_((cand[:, -1] > cut).any()):
                break
            width = min(2 * width, pre.shape[1])
        used = max(1, int(keep.sum(1).max()))  # candidates are sorted: trim the empty tail
        return idx[:, :used].contiguous(), keep[:, :used]

    @torch.no_grad()
    def observe(self, out: SaeOutput, shard: BatchShard | None = None) -> None:
        super().observe(out, shard)
        low = torch.where(out.vals > 0, out.vals, torch.inf).min().to(self.threshold.dtype)
        if shard is not None:
            low = shard.min_(low)
        decay = self.cfg.threshold_decay
        blended = torch.where(self.threshold > 0, decay * self.threshold + (1 - decay) * low, low)
        self.threshold.copy_(torch.where(torch.isfinite(low), blended, self.threshold))


@register_sae("matryoshka")
class MatryoshkaSae(BatchTopKSae):
    """BatchTopK SAE whose nested latent prefixes must each reconstruct (Bussmann et al. 2025).

    The prefixes come from ``cfg.matryoshka_prefixes``; the base forward decodes each latent
    group as its own bag and sums the prefix FVUs, so early latents learn general features.
    """

