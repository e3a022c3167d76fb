"""The unlearning training loop: batches, reference targets computed once, steps, checkpoints.

Cost model (what each shortcut approximates):

- **No logits tensor.** Log-probabilities come from the final hidden state and the LM-head
  weight through :mod:`mmie.losses`, chunked over real tokens, so a step never holds a
  ``[batch, tokens, vocab]`` array. Exact, not an approximation.
- **Reference computed once.** The reference model is the base model itself: LoRA runs under
  PEFT's ``disable_adapter()`` and ReFT without its hooks (:meth:`Adapter.reference`), so no
  second copy is loaded. Before the first step, every retain example that the schedule will
  visit gets its reference top-k log-probs and tail mass (:func:`mmie.losses.ref_topk`), and
  every forget example its reference sequence log-likelihood (NPO) or block activations
  (RMU), once. Exact for NPO and RMU (the reference is frozen).
- **Top-k KL.** The retain KL is the KL between reference and model coarsened to the
  reference's k most likely tokens plus one tail bucket (:func:`mmie.losses.topk_kl`): never
  above the full KL, equal to it when the model's tail is proportional to the reference's.
  ``retain_options`` ``exact=true`` restores the full-vocabulary KL (a reference forward every
  step).
- **Activations only as deep as needed.** RMU and the gate loss read block outputs; a pass that
  needs no logits stops after the deepest block it reads.

Batches: every step takes one forget batch and, when the objective (or the gate) needs retain
text, one retain batch, run one after the other. Texts are left-padded with explicit position
ids, so a text's hidden states do not depend on what it was batched with (the precomputed
reference stays valid in any batch). The schedule is fixed up front from the seed: forget
examples in shuffled epochs (or easiest-first with ``curriculum``), retain examples drawn set by
set with probability equal to the set's weight, each set in shuffled epochs of its own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmie import losses
from mmie.activations import real_token_mask
from mmie.adapters import Adapter
from mmie.errors import MmieError
from mmie.hooks import capture_blocks, run_until_stop
from mmie.models import LoadedModel, get_decoder, input_device, unwrap
from mmie.objectives import Objective, ObjectiveInputs, RetainInputs, RetainLoss
from mmie.reft import gate_loss


class TrainingDiverged(MmieError):
    """A loss or gradient became NaN or infinite; the last good checkpoint is kept."""


# --- batches ----------------------------------------------------------------------------------

@dataclass
class Batch:
    ids: Tensor        # [B, T] left-padded token ids
    attention: Tensor  # [B, T] 1 for real tokens
    positions: Tensor  # [B, T] position ids that ignore the left padding
    labels: Tensor     # [B, T] next-token ids (losses.shift_labels)
    label_mask: Tensor  # [B, T] positions that predict a real token
    real: Tensor       # [B, T] real tokens other than BOS (activation statistics)


def encode(lm: LoadedModel, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text; texts that give fewer than 2 tokens have nothing to predict."""
    ids = lm.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [list(row) for row in ids]


def collate(lm: LoadedModel, rows: Sequence[Sequence[int]]) -> Batch:
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    labels, label_mask = losses.shift_labels(ids, attention)
    real = real_token_mask(lm, {"input_ids": ids, "attention_mask": attention})
    return Batch(ids, attention, positions, labels, label_mask, real)


@dataclass
class Pass:
    """What one forward pass produced: final hidden states, one block's output, gate values."""

    hidden: Tensor | None
    acts: Tensor | None
    gates: dict[int, Tensor]


def forward(lm: LoadedModel, batch: Batch, *, hidden: bool, layer: int | None,
            stop: int | None = None) -> Pass:
    """Run the decoder body; without ``hidden`` stop after block ``max(layer, stop)``."""
    device = input_device(lm.model)
    kwargs = dict(input_ids=batch.ids.to(device), attention_mask=batch.attention.to(device),
                  position_ids=batch.positions.to(device), use_cache=False)
    body = get_decoder(lm.model)
    if hidden and layer is None:
        return Pass(body(**kwargs).last_hidden_state, None, {})
    if hidden:
        with capture_blocks(lm.blocks, [layer]) as store:
            out = body(**kwargs).last_hidden_state
        return Pass(out, store[layer], {})
    last = max(x for x in (layer, stop) if x is not None)
    read = sorted({last} | ({layer} if layer is not None else set()))
    with capture_blocks(lm.blocks, read, stop_after_last=True) as store:
        run_until_stop(lambda: body(**kwargs))
    return Pass(None, store.get(layer), {})


# --- reference targets, computed once --------------------------------------------------------

@dataclass
class References:
    forget_logp: dict[int, float] = field(default_factory=dict)     # summed log p, per text
    forget_tokens: dict[int, int] = field(default_factory=dict)      # predicted tokens, per text
    retain_topk: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    retain_acts: dict[int, Tensor] = field(default_factory=dict)     # [real tokens, d] per text


def _chunks(items: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(items, key=lambda i: lengths[i])  # similar lengths together: little padding
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def forget_references(lm: LoadedModel, adapter: Adapter, rows: list[list[int]],
                      which: Sequence[int], refs: References, batch_size: int,
                      chunk_size: int) -> None:
    head = losses.head_params(unwrap(lm.model))
    todo = [i for i in sorted(set(which)) if i not in refs.forget_logp]
    for chunk in _chunks(todo, [len(r) for r in rows], batch_size):
        batch = collate(lm, [rows[i] for i in chunk])
        with adapter.reference():
            out = forward(lm, batch, hidden=True, layer=None)
        mask = batch.label_mask.to(out.hidden.device)
        total, count = losses.sequence_logprobs(out.hidden, labels=batch.labels.to(mask.device),
                                                mask=mask, chunk_size=chunk_size, **head)
        for j, i in enumerate(chunk):
            refs.forget_logp[i], refs.forget_tokens[i] = float(total[j]), int(count[j])


@torch.no_grad()
def retain_references(lm: LoadedModel, adapter: Adapter, rows: list[list[int]],
                      which: Sequence[int], refs: References, *, top_k: int | None,
                      layer: int | None, batch_size: int, chunk_size: int) -> None:
    """Top-k targets (``top_k``) and/or block-``layer`` activations for each listed example."""
    head = losses.head_params(unwrap(lm.model))
    for chunk in _chunks(sorted(set(which)), [len(r) for r in rows], batch_size):
        batch = collate(lm, [rows[i] for i in chunk])
        with adapter.reference():
            out = forward(lm, batch, hidden=top_k is not None, layer=layer)
        if top_k is not None:
            mask = batch.label_mask.to(out.hidden.device)
            got = losses.ref_topk(out.hidden, k=top_k, mask=mask, chunk_size=chunk_size, **head)
            for j, i in enumerate(chunk):
                refs.retain_topk[i] = tuple(t[j][mask[j]].cpu() for t in got)
        if layer is not None:
            for j, i in enumerate(chunk):
                refs.retain_acts[i] = out.acts[j][batch.real[j].to(out.acts.device)].float().cpu()


def gather_topk(refs: References, rows: Sequence[int], batch: Batch, device) -> tuple:
    """The precomputed targets of ``rows`` laid out on the batch's label positions."""
    parts = [refs.retain_topk[i] for i in rows]
    mask = batch.label_mask
    out = []
    for j in range(3):
        pieces = torch.cat([p[j] for p in parts])
        full = pieces.new_zeros((*mask.shape, *pieces.shape[1:]))
        full[mask] = pieces
        out.append(full.to(device))
    return tuple(out)


# --- schedule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    forget: list[list[int]]  # per step: forget example indices
    retain: list[list[int]]  # per step: retain example indices (into the concatenated sets)


def _epochs(n: int, count: int, gen: torch.Generator, order: Sequence[int] | None) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        out += list(order) if order is not None else torch.randperm(n, generator=gen).tolist()
    return out[:count]


def build_schedule(n_forget: int, set_sizes: Sequence[int], weights: Sequence[float],
                   steps: int, batch_size: int, seed: int,
                   forget_order: Sequence[int] | None = None) -> Schedule:
    gen = torch.Generator().manual_seed(seed)
    total = steps * batch_size
    forget = _epochs(n_forget, total, gen, forget_order)
    sets = torch.multinomial(torch.tensor(weights, dtype=torch.float64), total, replacement=True,
                             generator=gen).tolist()
    offsets = [sum(set_sizes[:s]) for s in range(len(set_sizes))]
    streams = [iter(_epochs(n, sets.count(s), gen, None)) for s, n in enumerate(set_sizes)]
    retain = [offsets[s] + next(streams[s]) for s in sets]
    cut = lambda xs: [xs[i:i + batch_size] for i in range(0, total, batch_size)]  # noqa: E731
    return Schedule(cut(forget), cut(retain))


def curriculum_order(refs: References, n_forget: int) -> list[int]:
    """Easiest first: lowest total reference NLL, i.e. short and likely texts lead."""
    return sorted(range(n_forget), key=lambda i: (-refs.forget_logp[i], i))


# --- one step ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """The fixed parts of a run that a step needs."""

    objective: Objective
    retain_loss: RetainLoss
    act_layer: int | None      # RMU's block (None unless the objective reads activations)
    gate_weight: float
    max_grad_norm: float
    chunk_size: int


class Trainer:
    """Computes and applies one training step; everything it needs is prepared up front."""

    def __init__(self, lm: LoadedModel, adapter: Adapter, plan: Plan, forget: list[list[int]],
                 retain: list[list[int]], refs: References, schedule: Schedule, lr: float):
        self.lm, self.adapter, self.plan, self.refs = lm, adapter, plan, refs
        self.forget, self.retain, self.schedule = forget, retain, schedule
        self.params = adapter.trainable()
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self.gated = adapter.spec.gate is not None
        self.head = losses.head_params(unwrap(lm.model))

    def _run(self, batch: Batch, *, hidden: bool, layer: int | None) -> Pass:
        stop = max(self.adapter.spec.layers) if self.gated else None
        with self.adapter.edits() as gates:
            out = forward(self.lm, batch, hidden=hidden, layer=layer, stop=stop)
        out.gates = dict(gates)
        return out

    def _forget(self, step: int) -> tuple[dict, Pass, Batch]:
        needs, rows = self.plan.objective.needs, self.schedule.forget[step]
        batch = collate(self.lm, [self.forget[i] for i in rows])
        out = self._run(batch, hidden=needs.logprobs,
                        layer=self.plan.act_layer if needs.activations else None)
        got: dict = {}
        if needs.logprobs:
            mask = batch.label_mask.to(out.hidden.device)
            got["logp"], got["n_tokens"] = losses.sequence_logprobs(
                out.hidden, labels=batch.labels.to(mask.device), mask=mask,
                chunk_size=self.plan.chunk_size, **self.head)
        if needs.reference_logprobs:
            got["ref_logp"] = torch.tensor([self.refs.forget_logp[i] for i in rows],
                                           device=got["logp"].device)
        if needs.activations:
            got["activations"] = out.acts[batch.real.to(out.acts.device)]
        return got, out, batch

    def _needs_retain(self) -> bool:
        needs = self.plan.objective.needs
        return needs.retain_loss or needs.reference_activations or self.gated

    def _retain(self, step: int) -> tuple[dict, Pass, Batch]:
        needs, rows = self.plan.objective.needs, self.schedule.retain[step]
        batch = collate(self.lm, [self.retain[i] for i in rows])
        out = self._run(batch, hidden=needs.retain_loss,
                        layer=self.plan.act_layer if needs.reference_activations else None)
        got: dict = {}
        if needs.retain_loss:
            got["retain_loss"] = self._retain_loss(out, batch, rows)
        if needs.reference_activations:
            got["retain_activations"] = out.acts[batch.real.to(out.acts.device)]
            got["ref_retain_activations"] = torch.cat(
                [self.refs.retain_acts[i] for i in rows]).to(out.acts.device)
        return got, out, batch

    def _retain_loss(self, out: Pass, batch: Batch, rows: list[int]) -> Tensor:
        rl, device = self.plan.retain_loss, out.hidden.device
        ref_hidden = None
        if rl.needs_reference_hidden:  # exact KL: a reference forward every step
            with torch.no_grad(), self.adapter.reference():
                ref_hidden = forward(self.lm, batch, hidden=True, layer=None).hidden
        targets = gather_topk(self.refs, rows, batch, device) if rl.needs_reference_targets \
            else None
        return rl(RetainInputs(
            hidden=out.hidden, labels=batch.labels.to(device), mask=batch.label_mask.to(device),
            lm_head_weight=self.head["lm_head_weight"], lm_head_bias=self.head["bias"],
            softcap=self.head["softcap"], ref_targets=targets, ref_hidden=ref_hidden))

    def _gate_loss(self, f: tuple[Pass, Batch], r: tuple[Pass, Batch]) -> Tensor:
        per_layer = [gate_loss(f[0].gates[i][f[1].real.to(f[0].gates[i].device)],
                               r[0].gates[i][r[1].real.to(r[0].gates[i].device)])
                     for i in self.adapter.spec.layers]
        return torch.stack(per_layer).mean()

    def losses(self, step: int) -> dict[str, Tensor]:
        """``{'loss': total, 'forget', 'retain', 'gate'}`` terms for one step, plus the forget
        texts' token-mean NLL (``forget_nll``, not trained on) when the objective reads it."""
        got, f_out, f_batch = self._forget(step)
        parts: dict[str, Tensor] = {}
        if self._needs_retain():
            more, r_out, r_batch = self._retain(step)
            got.update(more)
            if self.gated:
                parts["gate"] = self._gate_loss((f_out, f_batch), (r_out, r_batch))
        inputs = ObjectiveInputs(**got)
        parts["forget"] = self.plan.objective.forget_loss(inputs)
        retain = self.plan.objective.retain_term(inputs)
        if retain is not None:
            parts["retain"] = retain
        parts["loss"] = parts["forget"] + (retain if retain is not None else 0.0) \
            + self.plan.gate_weight * parts.get("gate", 0.0)
        if "logp" in got:  # a saturating objective (NPO) hides progress; the NLL does not
            parts["forget_nll"] = (-got["logp"].sum() / got["n_tokens"].sum()).detach()
        return parts

    def step(self, step: int) -> dict:
        """One optimizer step; returns the curve record. Raises TrainingDiverged on NaN/inf."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.losses(step)
        values = {k: float(v.detach()) for k, v in parts.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(f"step {step + 1}: loss is not finite ({_fmt(values)})")
        parts["loss"].backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                                    self.plan.max_grad_norm))
        if not math.isfinite(norm):
            raise TrainingDiverged(f"step {step + 1}: gradient norm is {norm} ({_fmt(values)})")
        self.optimizer.step()
        return {"step": step + 1, **values, "grad_norm": norm,
                "seconds": time.perf_counter() - start}


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


# --- the loop and its checkpoints -------------------------------------------------------------

# settings that may change between a checkpoint and --resume: they do not alter the schedule
RESUMABLE_CHANGES = ("lr", "max_grad_norm", "checkpoint_every")


def checkpoint_dir(out: Path | str) -> Path:
    """Beside the artifact, not inside it: the artifact folder only ever holds a whole one."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def run_identity(settings: dict) -> dict:
    """The settings a checkpoint must match to be resumed."""
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


@dataclass(frozen=True)
class Loop:
    steps: int
    lr: float
    checkpoint_every: int  # 0: never
    checkpoint: Path
    identity: dict         # run_identity(...) of the run's settings
    desc: str


def train(trainer: Trainer, loop: Loop, resume: bool, progress) -> tuple[list[dict], int]:
    """Run the remaining steps; returns the curve and the step resumed from (0: fresh)."""
    ckpt = loop.checkpoint
    curve = load_checkpoint(ckpt, trainer, loop.identity) if resume and ckpt.is_dir() else []
    for group in trainer.optimizer.param_groups:
        group["lr"] = loop.lr  # a resumed run may lower the learning rate
    resumed = len(curve)
    with progress.task(loop.desc, total=loop.steps) as task:
        task.advance(resumed)
        for step in range(resumed, loop.steps):
            try:
                record = trainer.step(step)
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {_kept(ckpt)}") from exc
            curve.append(record)
            done = record["step"]
            if loop.checkpoint_every and done % loop.checkpoint_every == 0 and done < loop.steps:
                save_checkpoint(ckpt, trainer, curve, loop.identity)
            task.advance(**{k: record[k] for k in ("loss", "forget", "retain", "gate",
                                                   "forget_nll") if k in record})
    return curve, resumed


def _kept(ckpt: Path) -> str:
    if not (ckpt / "state.json").is_file():
        return "no checkpoint was written yet; lower --lr and rerun"
    return (f"the last good checkpoint is kept in {ckpt}; lower --lr and rerun with --resume "
            "to continue from it")


def save_checkpoint(path: Path, trainer: Trainer, curve: list[dict], identity: dict) -> None:
    """Adapter weights, optimizer, RNG and the curve so far; swapped in atomically."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainer.params.items()},
                  str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": trainer.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        state = {"step": len(curve), "curve": curve, "run": identity}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=str))
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint; re-raised
        raise


def _swap(tmp: Path, path: Path) -> None:
    old = path.with_name(path.name + f".old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, trainer: Trainer, identity: dict) -> list[dict]:
    """Restore a checkpoint written for the same run settings; returns the curve so far."""
    state = json.loads((path / "state.json").read_text())
    saved = json.loads(json.dumps(state["run"], default=str))
    current = json.loads(json.dumps(identity, default=str))
    if diff := sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k)):
        changes = ", ".join(f"{k}: {saved.get(k)!r} now {current.get(k)!r}" for k in diff)
        raise MmieError(f"{path}: checkpoint was written with other settings ({changes}); "
                        "rerun without --resume, or with the original settings")
    trainer.adapter.load_trainable(load_file(str(path / "adapter.safetensors")))
    bundle = torch.load(path / "trainer.pt", weights_only=True)
    trainer.optimizer.load_state_dict(bundle["optimizer"])
    torch.set_rng_state(bundle["torch_rng"])
    return list(state["curve"])
