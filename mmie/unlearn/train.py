"""The unlearning training loop: one step, data-parallel through accelerate, and the loop.

Cost model (what each shortcut approximates):

- **No logits tensor.** Log-probabilities come from the final hidden state and the LM-head
  weight through :mod:`mmie.core.losses`, chunked over real tokens, so a step never holds a
  ``[batch, tokens, vocab]`` array. Exact, not an approximation.
- **Reference computed once.** The reference model is the base model itself: LoRA runs under
  PEFT's ``disable_adapter()`` and ReFT without its hooks (:meth:`Adapter.reference`), so no
  second copy is loaded. Before the first step, every retain example that the schedule will
  visit gets its reference top-k log-probs and tail mass (:func:`mmie.core.losses.ref_topk`), and
  every forget example its reference sequence log-likelihood (NPO) or block activations
  (RMU), once (:mod:`mmie.unlearn.data`). Exact for NPO and RMU (the reference is frozen).
- **Top-k KL.** The retain KL is the KL between reference and model coarsened to the
  reference's k most likely tokens plus one tail bucket (:func:`mmie.core.losses.topk_kl`): never
  above the full KL, equal to it when the model's tail is proportional to the reference's.
  ``retain_options`` ``exact=true`` restores the full-vocabulary KL, from a per-token summary
  of the reference computed once like the top-k targets (:mod:`mmie.core.kl_stats`; a
  soft-capped head instead takes a reference forward every step).
- **Activations only as deep as needed.** RMU and the gate loss read block outputs; a pass that
  needs no logits stops after the deepest block it reads.

Batches: every step takes one forget batch and, when the objective (or the gate) needs retain
text, one retain batch, run one after the other.

Data parallelism: under ``torchrun`` / ``accelerate launch`` each process takes its share of
every step's forget and retain rows (:meth:`mmie.unlearn.data.Schedule.local`), so the global
batch is the one a single process would use, and accelerate's DDP averages the gradients. The
module DDP wraps (:class:`StepLoss`) holds only the adapter's trainable parameters: the frozen
base model is reached through a plain attribute, so DDP neither broadcasts it nor registers it
for reduction. Every loss term is a mean over a unit (sequences, predicted tokens or activation
tokens, :mod:`mmie.unlearn.objectives.base`); each process scales its term by ``W n_r / N`` (``n_r``
its count of that unit, ``N`` the global batch's, one all-reduce of a few numbers per step), so the
average over processes is exactly the global batch's mean, also for token-weighted losses whose
shares hold different token counts. The one approximation: KL ``token_frac`` draws each
process's subsample of positions separately (still an unbiased estimate of the mean KL).
Recorded losses are averaged over processes before the finiteness check, so a NaN on one
process stops every process at the same step; none is left waiting for the others.

Under an FSDP accelerate config (LoRA only) the whole model is sharded instead
(:mod:`mmie.unlearn.fsdp`) and nothing goes through DDP: FSDP averages the gradients the same
way, so the same scaling gives the global batch's mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mmie.core import losses, profile
from mmie.core.distributed import sharded_engine
from mmie.core.errors import MmieError
from mmie.core.models import LoadedModel, unwrap
from mmie.edits.adapters import Adapter
from mmie.edits.reft import gate_terms
from mmie.unlearn import fsdp as unlearn_fsdp
from mmie.unlearn.checkpoint import kept_message, load_checkpoint, save_checkpoint
from mmie.unlearn.data import Batch, Pass, References, Schedule, collate, forward, gather_targets
from mmie.unlearn.objectives import Objective, ObjectiveInputs, RetainInputs, RetainLoss
from mmie.unlearn.pairs import Rows


class TrainingDiverged(MmieError):
    """A loss or gradient became NaN or infinite; the last good checkpoint is kept."""


def make_accelerator(find_unused_parameters: bool = False):
    """accelerate's Accelerator for this process (plain, for one process outside a launcher).

    ``cpu=True`` without CUDA makes accelerate use gloo for CPU processes (see
    :func:`mmie.core.distributed.accelerator`). ``find_unused_parameters`` is DDP's: needed when a
    pass stops at RMU's block and leaves the edits of deeper blocks out of the graph; it costs a
    graph traversal per step, so it is off otherwise. An FSDP config is let through (the
    trainer shards the model itself); DeepSpeed and Megatron configs are refused.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # read the launcher's flag first: on CPU accelerate silently runs an FSDP config as DDP,
    # and a DeepSpeed one fails inside Accelerator() when deepspeed is not installed
    asked, acc = sharded_engine(), None
    if asked == "FSDP":  # handled by mmie.unlearn.fsdp, without accelerate's wrapping
        asked = None
    if asked is None:
        ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
        acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
        if acc.distributed_type == DistributedType.DEEPSPEED:
            asked = acc.distributed_type.value
    if asked:
        raise ValueError(
            f"unlearn runs with DDP (configs/accelerate/ddp.yaml) or FSDP (fsdp.yaml); this "
            f"accelerate config asks for {asked}, which mmie does not support (docs/scaling.md)")
    return acc


@dataclass
class Plan:
    """The fixed parts of a run that a step needs."""

    objective: Objective
    retain_loss: RetainLoss
    act_layer: int | None      # RMU's block (None unless the objective reads activations)
    gate_weight: float
    max_grad_norm: float
    chunk_size: int


@dataclass
class StepBatches:
    """One step's share of rows on this process, collated."""

    forget_rows: list[int]
    forget: Batch
    retain_rows: list[int]
    retain: Batch | None
    alternative: Batch | None = None  # the forget rows' prompts followed by their alternatives


class StepLoss(nn.Module):
    """What DDP wraps: the trainable parameters, and a forward computing one step's loss terms.

    The trainer (and through it the frozen model) is a plain attribute, not a submodule, so
    DDP's construction broadcasts only these parameters and reduces only their gradients.
    """

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.weights = nn.ParameterList(trainer.params.values())
        self.trainer = trainer

    def forward(self, batches: StepBatches, scales: dict[str, float]) -> dict[str, Tensor]:
        return self.trainer.losses(batches, scales)


class Trainer:
    """Computes and applies one training step; everything it needs is prepared up front.

    ``schedule`` is this process's share (:meth:`Schedule.local`); ``pairs``: scored spans and
    alternative rows of the forget rows (:mod:`mmie.unlearn.pairs`; None: whole texts).
    """

    def __init__(self, lm: LoadedModel, adapter: Adapter, plan: Plan, forget: list[list[int]],
                 retain: list[list[int]], refs: References, schedule: Schedule, lr: float,
                 pairs: Rows | None = None):
        self.lm, self.adapter, self.plan, self.refs = lm, adapter, plan, refs
        self.forget, self.retain, self.schedule = forget, retain, schedule
        self.pairs = pairs or Rows(forget)
        for p in adapter.trainable().values():
            p.requires_grad_(True)
        self.gated = adapter.spec.gate is not None
        # a pass that reads RMU's block stops there: edits of deeper blocks get no gradient
        stops_early = plan.act_layer is not None and plan.act_layer < max(adapter.spec.layers)
        self.accelerator = make_accelerator(find_unused_parameters=stops_early)
        # under an FSDP config accelerate's prepare would wrap StepLoss in FSDP: never use it
        self.fsdp_config = unlearn_fsdp.wanted()
        self.sharded = self.fsdp_config and self.accelerator.num_processes > 1
        if self.sharded:
            unlearn_fsdp.check(adapter.spec.method, plan.act_layer, 0, False)
            unlearn_fsdp.shard(lm)  # replaces the parameters: collect them afterwards
        self.params = adapter.trainable()
        self.head = losses.head_params(unwrap(lm.model))
        optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        if self.fsdp_config:  # FSDP reduces the gradients itself (one process: nothing to)
            self.module, self.optimizer = StepLoss(self), optimizer
        else:  # the model already sits where it computes (cuda:LOCAL_RANK under a launcher)
            self.module, self.optimizer = self.accelerator.prepare(
                StepLoss(self), optimizer, device_placement=[False, False])

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    def close(self) -> None:
        """Drop accelerate's references to the wrapped module, so the model can be released."""
        self.accelerator.free_memory()
        self.module = self.optimizer = None

    # --- forward passes and loss terms --------------------------------------------------------

    def _run(self, batch: Batch, *, hidden: bool, layer: int | None) -> Pass:
        stop = max(self.adapter.spec.layers) if self.gated else None
        with self.adapter.edits() as gates:
            out = forward(self.lm, batch, hidden=hidden, layer=layer, stop=stop)
        out.gates = dict(gates)
        return out

    def batches(self, step: int) -> StepBatches:
        f_rows, r_rows = self.schedule.forget[step], self.schedule.retain[step]
        retain = collate(self.lm, [self.retain[i] for i in r_rows]) if self._needs_retain() \
            else None
        alt, p = None, self.pairs
        if self.plan.objective.needs.alternative:
            alt = collate(self.lm, [p.alternative[i] for i in f_rows],
                          [p.alternative_starts[i] for i in f_rows])
        forget = collate(self.lm, [self.forget[i] for i in f_rows], p.starts(f_rows))
        return StepBatches(f_rows, forget, r_rows, retain, alt)

    def _logprobs(self, out: Pass, batch: Batch) -> tuple[Tensor, Tensor]:
        mask = batch.label_mask.to(out.hidden.device)
        return losses.sequence_logprobs(out.hidden, labels=batch.labels.to(mask.device),
                                        mask=mask, chunk_size=self.plan.chunk_size, **self.head)

    def _forget(self, s: StepBatches) -> tuple[dict, Pass | None]:
        needs, batch = self.plan.objective.needs, s.forget
        if not (needs.logprobs or needs.activations or self.gated):
            return {}, None  # e.g. redirect alone reads only the alternative rows
        out = self._run(batch, hidden=needs.logprobs,
                        layer=self.plan.act_layer if needs.activations else None)
        got: dict = {}
        if needs.logprobs:
            got["logp"], got["n_tokens"] = self._logprobs(out, batch)
        if needs.reference_logprobs:
            got["ref_logp"] = torch.tensor([self.refs.forget_logp[i] for i in s.forget_rows],
                                           device=got["logp"].device)
        if needs.activations:
            got["activations"] = out.acts[batch.real.to(out.acts.device)]
        return got, out

    def _alternative(self, s: StepBatches) -> dict:
        """Log-likelihood of each alternative after its forget prompt (its tokens only)."""
        out = self._run(s.alternative, hidden=True, layer=None)
        got = dict(zip(("alt_logp", "alt_n_tokens"), self._logprobs(out, s.alternative)))
        if self.plan.objective.needs.reference_alternative:
            ref = [self.refs.alternative_logp[i] for i in s.forget_rows]
            got["ref_alt_logp"] = torch.tensor(ref, device=got["alt_logp"].device)
        return got

    def _needs_retain(self) -> bool:
        needs = self.plan.objective.needs
        return needs.retain_loss or needs.reference_activations or self.gated

    def _retain(self, s: StepBatches) -> tuple[dict, Pass]:
        needs, batch, rows = self.plan.objective.needs, s.retain, s.retain_rows
        out = self._run(batch, hidden=needs.retain_loss,
                        layer=self.plan.act_layer if needs.reference_activations else None)
        got: dict = {}
        if needs.retain_loss:
            got["retain_loss"] = self._retain_loss(out, batch, rows)
        if needs.reference_activations:
            got["retain_activations"] = out.acts[batch.real.to(out.acts.device)]
            got["ref_retain_activations"] = torch.cat(
                [self.refs.retain_acts[i] for i in rows]).to(out.acts.device)
        return got, out

    def _retain_loss(self, out: Pass, batch: Batch, rows: list[int]) -> Tensor:
        rl, device = self.plan.retain_loss, out.hidden.device
        ref_hidden = summary = targets = None
        if rl.needs_reference_hidden and self.refs.retain_klstats:  # exact KL, linear head
            summary = gather_targets(self.refs.retain_klstats, rows, batch, device)
        elif rl.needs_reference_hidden:  # exact KL, soft-capped head: a reference forward
            with torch.no_grad(), self.adapter.reference():
                ref_hidden = forward(self.lm, batch, hidden=True, layer=None).hidden
        if rl.needs_reference_targets:
            targets = gather_targets(self.refs.retain_topk, rows, batch, device)
        return rl(RetainInputs(
            hidden=out.hidden, labels=batch.labels.to(device), mask=batch.label_mask.to(device),
            lm_head_weight=self.head["lm_head_weight"], lm_head_bias=self.head["bias"],
            softcap=self.head["softcap"], ref_targets=targets, ref_hidden=ref_hidden,
            ref_stats=summary))

    def _gate_loss(self, f: Pass, r: Pass, s: StepBatches, scales: dict[str, float]) -> Tensor:
        per_layer = []
        for i in self.adapter.spec.layers:
            on, off = gate_terms(f.gates[i][s.forget.real.to(f.gates[i].device)],
                                 r.gates[i][s.retain.real.to(r.gates[i].device)])
            per_layer.append(on * scales["forget:activation"] + off * scales["retain:activation"])
        return torch.stack(per_layer).mean()

    def losses(self, s: StepBatches, scales: dict[str, float]) -> dict[str, Tensor]:
        """``{'loss': total, 'forget', 'retain', 'gate'}`` terms of this process's share, each
        scaled by ``scales`` (:meth:`scales`), plus the forget texts' token-mean NLL
        (``forget_nll``, not trained on) when the objective reads it."""
        objective = self.plan.objective
        got, f_out = self._forget(s)
        if s.alternative is not None:
            got.update(self._alternative(s))
        parts: dict[str, Tensor] = {}
        if s.retain is not None:
            more, r_out = self._retain(s)
            got.update(more)
            if self.gated:
                parts["gate"] = self._gate_loss(f_out, r_out, s, scales)
        inputs = ObjectiveInputs(**got)
        parts["forget"] = sum(term * scales[f"forget:{unit}"]
                              for unit, term in objective.forget_terms(inputs).items())
        retain = objective.retain_term(inputs)
        if retain is not None:
            parts["retain"] = retain * scales[f"retain:{objective.retain_unit}"]
        parts["loss"] = parts["forget"] + parts.get("retain", 0.0) \
            + self.plan.gate_weight * parts.get("gate", 0.0)
        if "logp" in got:  # a saturating objective (NPO) hides progress; the NLL does not
            nll = -got["logp"].sum() / got["n_tokens"].sum()
            parts["forget_nll"] = (nll * scales["forget:token"]).detach()
        if "alt_logp" in got:  # what the redirect target's NLL has come down to
            nll = -got["alt_logp"].sum() / got["alt_n_tokens"].sum()
            parts["alternative_nll"] = (nll * scales["forget:alternative"]).detach()
        return parts

    # --- sharing the global batch between processes -------------------------------------------

    def counts(self, s: StepBatches) -> dict[str, int]:
        """This share's count of every unit a loss term averages over."""
        f = s.forget
        out = {"forget:sequence": len(s.forget_rows), "forget:token": int(f.label_mask.sum()),
               "forget:activation": int(f.real.sum())}
        if s.alternative is not None:
            out["forget:alternative"] = int(s.alternative.label_mask.sum())
        if s.retain is not None:
            out["retain:token"] = self.plan.retain_loss.scored(int(s.retain.label_mask.sum()))
            out["retain:activation"] = int(s.retain.real.sum())
        return out

    def scales(self, counts: dict[str, int]) -> dict[str, float]:
        """``W n_r / N`` per unit: DDP's average of the scaled terms is the global batch's mean."""
        if self.processes == 1:
            return dict.fromkeys(counts, 1.0)
        keys = sorted(counts)
        local = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64,
                             device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum").clamp(min=1.0)
        return {k: float(self.processes * local[i] / total[i]) for i, k in enumerate(keys)}

    def _global(self, parts: dict[str, Tensor]) -> dict[str, float]:
        """The step's loss values over the global batch (the mean of the processes' shares)."""
        if self.processes == 1:
            return {k: float(v.detach()) for k, v in parts.items()}
        local = torch.stack([v.detach().to(torch.float64) for v in parts.values()])
        mean = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean")
        return {k: float(x) for k, x in zip(parts, mean.tolist(), strict=True)}

    def step(self, step: int) -> dict:
        """One optimizer step; returns the curve record. Raises TrainingDiverged on NaN/inf."""
        if not self.sharded:
            return self._step(step)
        with unlearn_fsdp.gathered_head(self.lm) as self.head:  # read by the losses
            return self._step(step)

    def _step(self, step: int) -> dict:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        batches = self.batches(step)
        with profile.phase("forward"):
            parts = self.module(batches, self.scales(self.counts(batches)))
        values = self._global(parts)
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(f"step {step + 1}: loss is not finite ({_fmt(values)})")
        with profile.phase("backward"):
            self.accelerator.backward(parts["loss"])
        norm = self._clip()
        if not math.isfinite(norm):  # gradients are already averaged: every process agrees
            raise TrainingDiverged(f"step {step + 1}: gradient norm is {norm} ({_fmt(values)})")
        with profile.phase("optimizer"):
            self.optimizer.step()
        return {"step": step + 1, **values, "grad_norm": norm,
                "seconds": time.perf_counter() - start}

    def _clip(self) -> float:
        params, limit = list(self.params.values()), self.plan.max_grad_norm
        if self.fsdp_config:
            return unlearn_fsdp.grad_norm(params, limit)
        return float(self.accelerator.clip_grad_norm_(params, limit))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


# --- the loop ---------------------------------------------------------------------------------

SHOWN = ("loss", "forget", "retain", "gate", "forget_nll", "alternative_nll")  # on the bar

@dataclass(frozen=True)
class Loop:
    steps: int
    lr: float
    checkpoint_every: int  # 0: never
    checkpoint: Path
    identity: dict         # run_identity(...) of the run's settings
    desc: str
    main: bool = True      # this process writes checkpoints (rank 0 under a launcher)
    validate: Callable[[int], None] | None = None  # called at step 0, every N and the last
    validate_every: int = 0


def train(trainer: Trainer, loop: Loop, resume: bool, progress) -> tuple[list[dict], int]:
    """Run the remaining steps; returns the curve and the step resumed from (0: fresh)."""
    ckpt = loop.checkpoint
    curve = load_checkpoint(ckpt, trainer, loop.identity) if resume and ckpt.is_dir() else []
    for group in trainer.optimizer.param_groups:
        group["lr"] = loop.lr  # a resumed run may lower the learning rate
    resumed = len(curve)
    if loop.validate and not resumed:
        loop.validate(0)  # the unedited reference the validation rule compares to
    with progress.task(loop.desc, total=loop.steps) as task:
        task.advance(resumed)
        for step in range(resumed, loop.steps):
            try:
                record = trainer.step(step)
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {kept_message(ckpt)}") from exc
            curve.append(record)
            done = record["step"]
            if loop.main and loop.checkpoint_every and done % loop.checkpoint_every == 0 \
                    and done < loop.steps:
                save_checkpoint(ckpt, trainer, curve, loop.identity)
            if loop.validate and (done % loop.validate_every == 0 or done == loop.steps):
                loop.validate(done)
            task.advance(**{k: record[k] for k in SHOWN if k in record})
    return curve, resumed
