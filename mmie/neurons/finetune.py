"""Fine-tuning with selected MLP neurons frozen, and applying the result for re-scoring.

Freezing is done by gradient masks: tensor hooks on the MLP weights zero the gradient of the
selected neurons' down_proj columns and gate/up rows (GPT-2: c_proj rows and c_fc columns, since
Conv1D stores ``[in, out]``, plus the c_fc bias entries). The optimizer is plain Adam without
weight decay: with a zero gradient its moments stay zero and its update is exactly ``0 / (0 +
eps) = 0``, so frozen entries stay bit-identical. That is checked at the end against a copy of
the frozen entries taken before training, and a run that broke it is refused.

Two modes:

- full (default): only the MLP weights of the touched layers train (layers with at least one
  selected neuron, or ``train_layers``). The artifact (kind ``neurons``, role ``finetune``)
  holds just those weights, keyed ``layer{i}.<parameter name inside the block>``, and records the
  base model, so it stays small and :func:`applied` can swap them into a loaded base model.
- ``lora``: the base stays frozen and PEFT LoRA adapters on ``target_modules`` train: do they
  route around the frozen neurons? Saved as an ``adapter`` artifact in PEFT's layout
  (:mod:`mmie.edits.adapters`), so `evaluate` can take it as an arm. LoRA on an MLP projection
  changes the frozen neurons' *effective* weights (``metrics['lora_touches_mlp']``).

The model runs in eval mode (no dropout), so a seed fixes the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mmie.core.activations import tokenize
from mmie.core.artifacts import Artifact, load, save, sha256_file
from mmie.core.data import read_texts, sample
from mmie.core.errors import ArtifactError, MmieError
from mmie.core.models import LoadedModel, ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.edits.adapters import METHODS, AdapterSpec, load_adapter
from mmie.edits.neurons import (
    MlpModules,
    is_conv1d,
    load_mask,
    load_role,
    mask_mlps,
    resolve_layout,
    split_key,
)

WEIGHTS_STEM = "weights"


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `neurons finetune`.

    model: the base model. neurons: a ``neurons`` mask artifact (from `neurons select`).
    data: texts to fine-tune on (plain next-token NLL). field: their JSON field / column.
    lora: train LoRA adapters (base frozen) instead of the MLP weights.
    rank, alpha, target_modules: LoRA shape (update scaled by alpha / rank) and the linear
        layers it adapts. lora_layers: blocks that get LoRA; None = all.
    train_layers: full mode: blocks whose MLP trains; None = blocks with a selected neuron.
    epochs: passes over the data; steps: exact number of optimizer steps instead (the data is
        reshuffled and cycled as needed). lr: Adam learning rate; None = 5e-4 (LoRA) or 1e-5.
    batch_size, max_length, max_samples: texts per step, tokens per text, texts used.
    seed: seeds LoRA initialisation, the data order and the sample of ``max_samples``.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    neurons: str = ""
    data: str = ""
    field: str = "text"
    lora: bool = False
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: tuple[int, ...] | None = None
    train_layers: tuple[int, ...] | None = None
    epochs: int = 1
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 4
    max_length: int = 128
    max_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.neurons or not self.data:
            raise ValueError("a neurons mask artifact and a data file are both required")
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"epochs and steps must be >= 1, got {self.epochs}, {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.lora and self.train_layers is not None:
            raise ValueError("train_layers is for full fine-tuning; LoRA uses lora_layers")
        if not self.lora and self.lora_layers is not None:
            raise ValueError("lora_layers needs lora")
        if self.lora:
            self.adapter_spec(1)  # validates rank, alpha and target modules

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.lora else 1e-5)

    def adapter_spec(self, n_layers: int) -> AdapterSpec:
        layers = self.lora_layers if self.lora_layers is not None else range(n_layers)
        return AdapterSpec(method="lora", layers=tuple(layers), rank=self.rank, alpha=self.alpha,
                           target_modules=self.target_modules)

    def to_dict(self) -> dict:
        return {**asdict(self), "model": asdict(self.model), "lr": self.learning_rate}


# --- gradient masks ---------------------------------------------------------------------------

def _neuron_axis(module: nn.Module, down: bool) -> int:
    """Axis of ``module.weight`` indexed by neuron (Conv1D stores [in, out])."""
    return int(down) ^ int(is_conv1d(module))


def _keep(param: Tensor, axis: int, frozen: Tensor) -> Tensor:
    shape = [1] * param.dim()
    shape[axis] = -1
    return (~frozen).to(param.device, param.dtype).reshape(shape)


def neuron_params(mods: MlpModules, frozen: Tensor) -> dict[str, tuple[nn.Parameter, Tensor]]:
    """``<child>.weight|bias`` inside the MLP -> (parameter, 0/1 gradient mask)."""
    names = {id(m): n for n, m in mods.mlp.named_children()}
    parts = [(m, False) for m in mods.rows.values()] + [(mods.down, True)]
    out = {}
    for module, down in parts:
        name = names[id(module)]
        out[f"{name}.weight"] = (module.weight, _keep(module.weight, _neuron_axis(module, down),
                                                      frozen))
        if getattr(module, "bias", None) is not None:
            # a row projection's bias entry j belongs to neuron j; down's bias to no neuron
            keep = torch.ones_like(module.bias) if down else _keep(module.bias, 0, frozen)
            out[f"{name}.bias"] = (module.bias, keep)
    return out


def masked_params(lm: LoadedModel, masks: dict[int, Tensor],
                  where: str) -> dict[str, tuple[nn.Parameter, Tensor]]:
    """``layer{i}.<parameter name inside the block>`` -> (parameter, gradient mask)."""
    mlps = mask_mlps(lm, masks, where)
    mlp_name = resolve_layout(lm.blocks[min(masks)]).mlp
    return {f"layer{i}.{mlp_name}.{name}": pair for i, mods in mlps.items()
            for name, pair in neuron_params(mods, masks[i]).items()}


@contextmanager
def gradient_masks(masked: Sequence[tuple[nn.Parameter, Tensor]]) -> Iterator[None]:
    """Multiply each parameter's gradient by its mask; the tensor hooks go in ``finally``."""
    handles = []
    try:
        for param, keep in masked:
            handles.append(param.register_hook(lambda grad, keep=keep: grad * keep))
        yield
    finally:
        for handle in handles:
            handle.remove()


def frozen_entries(masked: Sequence[tuple[nn.Parameter, Tensor]]) -> list[Tensor]:
    """Copies of the entries whose gradient is masked (small: only the frozen neurons)."""
    return [param.detach()[keep.expand_as(param) == 0].clone() for param, keep in masked]


def frozen_unchanged(masked: Sequence[tuple[nn.Parameter, Tensor]], before: list[Tensor]) -> bool:
    now = frozen_entries(masked)
    return all(torch.equal(a, b) for a, b in zip(now, before, strict=True))


# --- training ---------------------------------------------------------------------------------

def _order(n: int, config: FinetuneConfig) -> Iterator[list[int]]:
    """Batches of text indices: ``epochs`` shuffled passes, or exactly ``steps`` batches."""
    gen = torch.Generator().manual_seed(config.seed)
    total = config.steps or config.epochs * -(-n // config.batch_size)
    done = 0
    while done < total:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, config.batch_size):
            if done == total:
                return
            yield perm[start:start + config.batch_size]
            done += 1


def nll(lm: LoadedModel, texts: Sequence[str], max_length: int) -> Tensor:
    """Mean next-token NLL over the real tokens of ``texts`` (padding ignored)."""
    enc = tokenize(lm, texts, max_length)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    device = lm.device
    out = lm.model(input_ids=enc["input_ids"].to(device),
                   attention_mask=enc["attention_mask"].to(device), labels=labels.to(device),
                   use_cache=False)
    return out.loss


def train(lm: LoadedModel, params: Sequence[nn.Parameter], texts: Sequence[str],
          config: FinetuneConfig, progress: Progress = SILENT) -> list[float]:
    """Adam (no weight decay) on ``params``; returns the loss of every step."""
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, weight_decay=0.0)
    losses = []
    batches = list(_order(len(texts), config))
    with torch.enable_grad(), progress.task("finetune", total=len(batches)) as task:
        for idx in batches:
            loss = nll(lm, [texts[i] for i in idx], config.max_length)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            task.advance(loss=losses[-1])
    return losses


@contextmanager
def trainable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    for param in params:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(False)


# --- the two modes ----------------------------------------------------------------------------

@dataclass
class Trained:
    """What a mode hands to :func:`mmie.core.artifacts.save`, plus its losses."""

    losses: list[float]
    kind: str
    config: dict
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    writer: object = None
    metrics: dict = field(default_factory=dict)


@contextmanager
def _full(lm: LoadedModel, masks: dict[int, Tensor], texts: list[str], config: FinetuneConfig,
          progress: Progress) -> Iterator[Trained]:
    layers = config.train_layers or [i for i, m in sorted(masks.items()) if m.any()]
    if not layers:
        raise MmieError(f"{config.neurons}: the mask selects no neuron, so no layer is touched; "
                        "pass train_layers to choose the MLPs that train")
    width = next(iter(masks.values())).shape
    chosen = {i: masks.get(i, torch.zeros(width, dtype=torch.bool)) for i in layers}
    params = masked_params(lm, chosen, config.neurons)
    tensors = [p for p, _ in params.values()]
    with trainable(tensors), gradient_masks(list(params.values())):
        losses = train(lm, tensors, texts, config, progress)
    weights = {k: p.detach().clone() for k, (p, _) in params.items()}
    yield Trained(losses, "neurons", {"role": "finetune", "mode": "full", "layers": layers},
                  {WEIGHTS_STEM: weights}, metrics={"trained_params": _count(tensors)})


@contextmanager
def _lora(lm: LoadedModel, masks: dict[int, Tensor], texts: list[str], config: FinetuneConfig,
          progress: Progress) -> Iterator[Trained]:
    del masks  # the base is frozen as a whole; only the adapters train
    spec = config.adapter_spec(lm.n_layers)
    adapter = METHODS["lora"].create(lm, spec)
    try:
        tensors = list(adapter.trainable().values())
        losses = train(lm, tensors, texts, config, progress)
        layout = resolve_layout(lm.blocks[0])
        touches = sorted(set(spec.target_modules) & {*layout.rows, layout.down})
        yield Trained(losses, "adapter", {"role": "finetune", "mode": "lora",
                                          "adapter": spec.to_dict(), "method": "lora",
                                          "objective": "nll-frozen-neurons"},
                      writer=adapter.payload().writer,
                      metrics={"trained_params": _count(tensors), "lora_touches_mlp": touches})
    finally:
        adapter.remove()


MODES = {"full": _full, "lora": _lora}


def _count(params: Sequence[Tensor]) -> int:
    return int(sum(p.numel() for p in params))


def _metrics(trained: Trained, masks: dict[int, Tensor], texts: list[str]) -> dict:
    losses = trained.losses
    return {**trained.metrics, "steps": len(losses), "loss_first": losses[0],
            "loss_last": losses[-1], "losses": losses, "n_texts": len(texts),
            "n_frozen": int(sum(int(m.sum()) for m in masks.values())),
            "frozen_bit_identical": True}


def run_finetune(config: FinetuneConfig, out: Path | str, *, force: bool = False,
                 progress: Progress = SILENT) -> Artifact:
    """Fine-tune with the mask's neurons frozen and save the result (module docstring)."""
    texts = sample(read_texts(config.data, config.field), config.max_samples, config.seed)
    load_role(config.neurons, ("mask",))  # a wrong artifact fails before the model loads
    with loaded(config.model) as lm:
        _, masks = load_mask(config.neurons, lm.identity)
        watched = list(masked_params(lm, masks, config.neurons).values())
        before = frozen_entries(watched)
        torch.manual_seed(config.seed)
        with MODES["lora" if config.lora else "full"](lm, masks, texts, config,
                                                      progress) as trained:
            if not frozen_unchanged(watched, before):
                raise MmieError("frozen neuron weights changed during fine-tuning; not saved")
            settings = {**config.to_dict(), **trained.config,
                        "data_sha256": sha256_file(Path(config.data))}
            return save(out, trained.kind, tensors=trained.tensors, config=settings,
                        model=lm.identity, parents=[config.neurons], writer=trained.writer,
                        metrics=_metrics(trained, masks, texts), force=force)


# --- applying a fine-tune for scoring ---------------------------------------------------------

@contextmanager
def _with_adapter(lm: LoadedModel, artifact: Artifact) -> Iterator[None]:
    adapter = load_adapter(artifact.path, lm)
    try:
        with adapter.edits():
            yield
    finally:
        adapter.remove()


def _block_param(lm: LoadedModel, key: str, where: str) -> nn.Parameter:
    parts = split_key(key)
    if parts is None or not 0 <= parts[0] < lm.n_layers:
        raise ArtifactError(f"{where}: weight '{key}' names no block of {lm.identity.name}")
    try:
        return lm.blocks[parts[0]].get_parameter(parts[1])
    except AttributeError as exc:
        raise ArtifactError(f"{where}: weight '{key}' is not a parameter of the model") from exc


@contextmanager
def _with_weights(lm: LoadedModel, artifact: Artifact) -> Iterator[None]:
    load_role(artifact, ("finetune",))
    weights = artifact.tensors(WEIGHTS_STEM)
    params = {k: _block_param(lm, k, str(artifact.path)) for k in weights}
    if bad := [k for k, p in params.items() if p.shape != weights[k].shape]:
        raise ArtifactError(f"{artifact.path}: weights of another shape than the model's: "
                            f"{', '.join(bad)}")
    originals = {k: p.detach().clone() for k, p in params.items()}
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(originals[k])


APPLIERS = {"adapter": _with_adapter, "neurons": _with_weights}


@contextmanager
def applied(lm: LoadedModel, path: Path | str | None) -> Iterator[Artifact | None]:
    """Inside, ``lm`` is the fine-tuned model of ``path`` (None: unchanged); restored on exit."""
    if path is None:
        yield None
        return
    artifact = load(path, model=lm.identity)
    if artifact.kind not in APPLIERS:
        raise ArtifactError(f"{path}: a {artifact.kind} artifact is no fine-tuned model "
                            f"(expected {' or '.join(APPLIERS)})")
    with APPLIERS[artifact.kind](lm, artifact):
        yield artifact
